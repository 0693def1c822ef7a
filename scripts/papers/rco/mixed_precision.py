"""Mixed-precision bit-widths of the trained quickstart GPT at an average of 4.0 (and 3.0) bits:
full precision vs uniform 4-bit vs the penalty method vs RCO, all final assignments exactly on
budget (exact-budget DP rounding), val loss on all validation blocks. Both searches minimize
the KL divergence from the full-precision model on training batches, start from the
weight-MSE sensitivity logits, and use the same steps, lr, batches and Gumbel noise.

Needs the trained GPT: ``python -m toolkit fit --config recipes/quickstart.yaml`` (runs/quickstart).

    python -m scripts.papers.rco.mixed_precision   # docs/results/rco_mixed_precision_lm.json, docs/rco.md
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from toolkit import TextDataModule
from toolkit.data.text import BlockStream
from toolkit.modules.base import cross_entropy
from toolkit.modules.bitsearch import BitWidthSearch

COMMAND = "python -m scripts.papers.rco.mixed_precision"
RECIPE = "rco_mixed_precision_lm"


@torch.no_grad()
def val_loss(module: BitWidthSearch, loader) -> float:
    total, n = 0.0, 0
    for x, y in loader:
        total += float(cross_entropy(module.gpt(x), y)) * x.shape[0]
        n += x.shape[0]
    return total / n


@torch.no_grad()
def search_kl(module: BitWidthSearch, batches, reference) -> float:
    """The searches' own objective (KL from full precision) on fixed training batches."""
    return sum(float(F.kl_div(torch.log_softmax(module.gpt(x), -1).flatten(0, -2), ref,
                              log_target=True, reduction="batchmean"))
               for (x, _), ref in zip(batches, reference)) / len(batches)


def search(args, avg: float, method: str, penalty: float, dm: TextDataModule, seed: int
           ) -> BitWidthSearch:
    module = BitWidthSearch(checkpoint=args.checkpoint, avg_bits=avg, method=method,
                            lr=args.lr, penalty=penalty, sample_seed=seed)
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    t0 = time.time()
    trainer.fit(module, dm)
    module.search_seconds = time.time() - t0
    return module


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/quickstart")
    ap.add_argument("--avg-bits", type=float, nargs="+", default=[4.0, 3.0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--penalties", type=float, nargs="+", default=[10.0, 1000.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm = TextDataModule(block_size=128, batch_size=16, val_blocks=256, seed=1)
    loader = torch.utils.data.DataLoader(dm.val_dataloader().dataset, batch_size=64)
    values: dict[str, float] = {}
    rows: list[tuple[str, float, float, float, str]] = []
    stream = BlockStream(dm.train_data, 128, 16, 1, 0, 1, 0)  # the searches' first batches
    kl_batches = [stream.batch(i) for i in range(12)]
    reference: list[torch.Tensor] = []

    def record(key: str, label: str, module: BitWidthSearch, choice, note: str = "") -> None:
        if not reference:
            module.set_choice(None)
            with torch.no_grad():
                reference.extend(torch.log_softmax(module.gpt(x), -1).flatten(0, -2)
                                 for x, _ in kl_batches)
        module.set_choice(choice)
        loss = val_loss(module, loader)
        kl = search_kl(module, kl_batches, reference)
        bits = 32.0 if choice is None else module.avg_bits_of(choice)
        values[f"{key}/val_loss"] = round(loss, 4)
        values[f"{key}/train_kl"] = round(kl, 5)
        values[f"{key}/avg_bits"] = round(bits, 6)
        rows.append((label, loss, kl, bits, note))
        print(f"{label:40s} val {loss:.4f} train KL {kl:.5f} avg bits {bits:.4f}  {note}",
              flush=True)

    for avg in args.avg_bits:
        tag = f"avg{avg:g}"
        for seed in args.seeds:
            rco = search(args, avg, "rco", 0.0, dm, seed)
            if seed == args.seeds[0]:
                if avg == args.avg_bits[0]:
                    record("full_precision", "full precision (fp32)", rco, None)
                if float(avg).is_integer() and int(avg) in rco.hparams.bits:
                    uni = torch.full((len(rco.layers),), rco.hparams.bits.index(int(avg)))
                    record(f"{tag}/uniform", f"uniform {avg:g}-bit", rco, uni)
                init = BitWidthSearch(checkpoint=args.checkpoint, avg_bits=avg, init="sensitivity")
                c = init.assignment()
                record(f"{tag}/sensitivity_init_dp", f"{avg:g} bits: weight-MSE init + DP, no search",
                       init, c, f"bits {list(init.bits_table(c).values())}")
            choice = rco.assignment()
            record(f"{tag}/rco_seed{seed}", f"{avg:g} bits: RCO, seed {seed}", rco, choice,
                   f"{rco.search_seconds:.0f} s search; expected bits at end "
                   f"{rco.expected_avg_bits():.6f}; bits {list(rco.bits_table(choice).values())}")
            for lam in args.penalties:
                pen = search(args, avg, "penalty", lam, dm, seed)
                c = pen.assignment()
                record(f"{tag}/penalty{lam:g}_seed{seed}",
                       f"{avg:g} bits: penalty lam={lam:g}, DP rounding, seed {seed}", pen, c,
                       f"expected bits at end {pen.expected_avg_bits():.4f}; "
                       f"bits {list(pen.bits_table(c).values())}")
                c = pen.assignment("argmax")
                record(f"{tag}/penalty{lam:g}_argmax_seed{seed}",
                       f"{avg:g} bits: penalty lam={lam:g}, argmax, seed {seed}", pen, c,
                       "on budget" if abs(pen.avg_bits_of(c) - avg) < 1e-9 else "OFF budget")
        for m in ["rco"] + [f"penalty{lam:g}" for lam in args.penalties]:
            mean = {f: sum(values[f"{tag}/{m}_seed{s}/{f}"] for s in args.seeds) / len(args.seeds)
                    for f in ("val_loss", "train_kl")}
            values[f"{tag}/{m}_mean/val_loss"] = round(mean["val_loss"], 4)
            values[f"{tag}/{m}_mean/train_kl"] = round(mean["train_kl"], 5)
            rows.append((f"**{avg:g} bits: {m}, mean of {len(args.seeds)} seeds**",
                         mean["val_loss"], mean["train_kl"], avg, ""))
    root = Path(__file__).resolve().parents[3]
    cmd = (f"{COMMAND} --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} "
           f"--avg-bits {' '.join(f'{a:g}' for a in args.avg_bits)} "
           f"--penalties {' '.join(f'{p:g}' for p in args.penalties)}")
    from scripts.results import record
    record(RECIPE, values, command=cmd)
    table = ["| assignment | val loss | train KL from fp32 | average bits | note |",
             "| --- | --- | --- | --- | --- |"]
    table += [f"| {label} | {loss:.4f} | {kl:.5f} | {bits:.4f} | {note} |"
              for label, loss, kl, bits, note in rows]
    md_path = root / "docs/rco.md"
    md = md_path.read_text() if md_path.exists() else ""
    start, end = "<!-- rco-mixed-precision-table -->", "<!-- /rco-mixed-precision-table -->"
    block = (f"{start}\n" + "\n".join(table) + f"\n\nQuickstart GPT ({args.checkpoint}), 16 block "
             f"linears, bits {{2, 3, 4, 8}}, budgets {args.avg_bits} average bits weighted by "
             f"parameter count, {args.steps} search steps of batch 16 x 128 (training split, KL to "
             f"the full-precision model), "
             f"val loss on 256 validation blocks, train KL on the searches' first 12 batches; `{cmd}`.\n{end}")
    if start in md:
        md = md[:md.index(start)] + block + md[md.index(end) + len(end):]
    else:
        md = md + "\n" + block + "\n"
    md_path.write_text(md)
    print("\n".join(table))


if __name__ == "__main__":
    main()
