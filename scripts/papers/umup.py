"""u-muP at CPU scale: lr transfer across width (sp / mup / umup) and simulated FP8.

    python -m scripts.papers.umup transfer --out runs/umup --threads 1
    python -m scripts.papers.umup fp8 --out runs/umup --threads 1
    python -m scripts.papers.umup report --out runs/umup     # table, figure, docs/results

``transfer``: for each parametrization and width, AdamW at each lr of its x2 grid (equal tokens
at every width), the char GPT on Tiny Shakespeare (``scripts.lm_run``'s bare Trainer, final
validation loss). ``fp8``: the best lr of each parametrization at one width, trained again with
every linear layer's matmul in simulated FP8 (E4M3 operands, E5M2 gradients). Both resume:
finished runs in ``OUT/results.json`` are skipped. ``report`` writes ``OUT/results.md``,
``docs/figures/umup_lr_transfer.png`` and (``--record``) ``docs/results/umup_lm.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scripts.sweep_io import open_sweep

ROOT = Path(__file__).resolve().parents[2]
# x2 grids around each parametrization's best lr at width 64 (a 200-step pilot over 2^-10..2^-3
# for sp/mup, 2^-4..2^3 for umup's eta); sp's best may fall with width, so its grid reaches lower
GRIDS = {"sp": [2 ** k for k in range(-10, -5)], "mup": [2 ** k for k in range(-10, -5)],
         "umup": [2 ** k for k in range(-3, 2)]}
SETUP = dict(n_layer=2, block_size=64, batch_size=16, steps=300, val_blocks=256, warmup_frac=0.05)


def train(parametrization: str, width: int, lr: float, fp8: bool = False, seed: int = 0,
          steps: int = SETUP["steps"], mults: dict | None = None) -> dict:
    import lightning as L
    from scripts.lm_run import fit_quietly
    from toolkit import LanguageModel, TextDataModule
    L.seed_everything(seed, verbose=False)
    model = LanguageModel(block_size=SETUP["block_size"], n_layer=SETUP["n_layer"],
                          n_head=max(1, width // 32), n_embd=width, optimizer="adamw", lr=lr,
                          weight_decay=0.0, optimizer_kwargs={"betas": [0.9, 0.99]},
                          warmup_steps=round(SETUP["warmup_frac"] * steps), lr_decay="cosine",
                          min_lr_ratio=0.1, parametrization=parametrization, fp8=fp8,
                          **(mults or {}))
    data = TextDataModule(block_size=SETUP["block_size"], batch_size=SETUP["batch_size"],
                          val_blocks=SETUP["val_blocks"], seed=seed)
    val, wall = fit_quietly(model, data, steps)
    return {"parametrization": parametrization, "width": width, "lr": lr, "fp8": fp8,
            "seed": seed, "steps": steps, "val_loss": val, "wall_s": round(wall, 1),
            **({"mults": mults} if mults else {})}


def key(r: dict) -> str:
    m = "".join(f"_{k}{v:g}" for k, v in sorted((r.get("mults") or {}).items()))
    return f"{r['parametrization']}_w{r['width']}_lr{r['lr']:g}_fp8{int(r['fp8'])}_s{r['seed']}{m}"


def best(results: list[dict], par: str, width: int, fp8: bool = False,
         mults: bool = False) -> dict | None:
    """Best run of a (parametrization, width, precision); ``mults``: among the multiplier
    sweep's runs too (else only runs at the default multipliers)."""
    rs = [r for r in results if (r["parametrization"], r["width"], r["fp8"]) == (par, width, fp8)
          and math.isfinite(r["val_loss"]) and (mults or not r.get("mults"))]
    return min(rs, key=lambda r: r["val_loss"]) if rs else None


def run_grid(jobs: list[tuple], results: list[dict], path: Path) -> None:
    done = {key(r) for r in results}
    for par, width, lr, fp8, *mults in jobs:
        mults = mults[0] if mults else None
        probe = {"parametrization": par, "width": width, "lr": lr, "fp8": fp8, "seed": 0,
                 "mults": mults}
        if key(probe) in done:
            continue
        r = train(par, width, lr, fp8, mults=mults)
        print(f"{key(r)}: val {r['val_loss']:.4f} ({r['wall_s']:.0f}s)", flush=True)
        results.append(r)
        path.write_text(json.dumps(results, indent=1))


def transfer_jobs(pars, widths, lrs=None) -> list[tuple]:
    return [(p, w, lr, False) for p in pars for w in widths for lr in (lrs or GRIDS[p])]


def fp8_jobs(results: list[dict], pars, width: int) -> list[tuple]:
    jobs = []
    for p in pars:
        b = best(results, p, width)
        if b is None:
            raise SystemExit(f"run `transfer` for {p} at width {width} first (fp8 reuses its best lr)")
        jobs.append((p, width, b["lr"], True))
    return jobs


MULTS = ("residual_mult", "residual_attn_ratio", "attn_softmax_mult", "ffn_act_mult",
         "output_mult")


def mult_jobs(results: list[dict], width: int, factors=(0.5, 2.0)) -> list[tuple]:
    """u-muP's named multipliers one at a time at x0.5 and x2 of their default 1, at the best eta
    of the lr sweep (the paper's independent search, Sec. 4.5, reduced to two points each)."""
    b = best(results, "umup", width)
    if b is None:
        raise SystemExit(f"run `transfer` for umup at width {width} first")
    return [("umup", width, b["lr"], False, {m: f}) for m in MULTS for f in factors]


def summarize(results: list[dict], pars, widths, fp8_width: int) -> dict:
    """Best lr per (parametrization, width), the shift of the best lr in x2 grid steps, the
    default-lr gap of umup, and the FP8 gaps."""
    out: dict = {}
    for p in pars:
        lrs = [best(results, p, w)["lr"] for w in widths if best(results, p, w)]
        out[f"{p}_best_lrs"] = lrs
        out[f"{p}_shift_steps"] = round(math.log2(max(lrs) / min(lrs))) if lrs else None
        for w in widths:
            b = best(results, p, w)
            if b:
                out[f"{p}_w{w}_best_val"] = round(b["val_loss"], 4)
        b32, b8 = best(results, p, fp8_width), best(results, p, fp8_width, fp8=True)
        if b32 and b8:
            out[f"{p}_fp32_val"], out[f"{p}_fp8_val"] = round(b32["val_loss"], 4), round(
                b8["val_loss"], 4)
            out[f"{p}_fp8_gap_pct"] = round(100 * (b8["val_loss"] / b32["val_loss"] - 1), 2)
    bm = best(results, "umup", widths[0], mults=True)
    b0 = best(results, "umup", widths[0])
    if bm and b0 and any(r.get("mults") for r in results):
        out["umup_mult_best"] = ", ".join(f"{k} {v:g}" for k, v in (bm.get("mults") or {}).items()
                                          ) or "the defaults"
        out["umup_default_vs_mult_best_pct"] = round(100 * (b0["val_loss"] / bm["val_loss"] - 1), 2)
    for w in widths:  # umup at its default lr (1.0) against its own best
        d = [r for r in results if (r["parametrization"], r["width"], r["lr"], r["fp8"])
             == ("umup", w, 1.0, False)]
        b = best(results, "umup", w)
        if d and b:
            out[f"umup_w{w}_default_gap_pct"] = round(100 * (d[0]["val_loss"] / b["val_loss"] - 1), 2)
    return out


def table(results: list[dict], pars, widths) -> str:
    rows = ["| parametrization | width | " + " | ".join(["lr -> val loss"]) + " | best lr |",
            "|---|---|---|---|"]
    for p in pars:
        for w in widths:
            rs = sorted((r for r in results if (r["parametrization"], r["width"], r["fp8"])
                         == (p, w, False) and not r.get("mults")), key=lambda r: r["lr"])
            if rs:
                b = best(results, p, w)
                cells = ", ".join(("**%g: %.3f**" if r is b else "%g: %.3f") % (r["lr"], r["val_loss"])
                                  for r in rs)
                rows.append(f"| {p} | {w} | {cells} | {b['lr']:g} |")
    rows += ["", "| run | val loss |", "|---|---|"]
    rows += [f"| {key(r)} | {r['val_loss']:.4f} |" for r in results if r["fp8"] or r.get("mults")]
    return "\n".join(rows)


def plot(results: list[dict], pars, widths, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(pars), figsize=(4 * len(pars), 3.4), sharey=True)
    for ax, p in zip(axes, pars):
        for w in widths:
            pts = sorted((r["lr"], r["val_loss"]) for r in results
                         if (r["parametrization"], r["width"], r["fp8"]) == (p, w, False)
                         and not r.get("mults"))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"width {w}")
        ax.set_xscale("log", base=2)
        ax.set_title(p)
        ax.set_xlabel("lr (umup: eta)")
    axes[0].set_ylabel(f"val loss after {SETUP['steps']} steps")
    lo = min(r["val_loss"] for r in results if math.isfinite(r["val_loss"]))
    axes[0].set_ylim(lo - 0.05, lo + 0.8)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["transfer", "fp8", "mults", "report"])
    ap.add_argument("--pars", nargs="+", default=["sp", "mup", "umup"])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--fp8-width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lrs", type=float, nargs="+", help="override the grid (transfer)")
    ap.add_argument("--out", default="runs/umup")
    ap.add_argument("--merge", nargs="*", default=[], help="more OUT folders to report with")
    ap.add_argument("--record", action="store_true", help="write docs/results/umup_lm.json")
    args = ap.parse_args(argv)
    out, path, own = open_sweep(args.out, args.threads, [])
    merged = [r for extra in args.merge  # sweeps run as separate processes, each with its OUT
              if (Path(extra) / "results.json").is_file()
              for r in json.loads((Path(extra) / "results.json").read_text())]
    results = own + merged
    if args.stage == "transfer":
        run_grid(transfer_jobs(args.pars, args.widths, args.lrs), own, path)
    elif args.stage == "mults":
        run_grid(mult_jobs(results, args.widths[0]), own, path)
    elif args.stage == "fp8":
        run_grid(fp8_jobs(results, args.pars, args.fp8_width), own, path)
    else:
        s = summarize(results, args.pars, args.widths, args.fp8_width)
        md = f"# u-muP sweep ({SETUP})\n\n{table(results, args.pars, args.widths)}\n\n{s}\n"
        (out / "results.md").write_text(md)
        print(md)
        plot(results, args.pars, args.widths, ROOT / "docs" / "figures" / "umup_lr_transfer.png")
        if args.record:
            from scripts.results import record
            record("umup_lm", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
