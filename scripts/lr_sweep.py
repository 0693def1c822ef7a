"""Learning-rate x width (x depth) grid for any registered optimizer on the char GPT.

    python -m scripts.lr_sweep --optimizer hyperp --lrs 0.005 0.01 0.02 --widths 32 64 128 \
        --depths 4 --steps 300 --out runs/sweeps/hyperp

Each grid point trains the quickstart LanguageModel on embedded Tiny Shakespeare with the
quickstart schedule (warmup, cosine to 0.1x) and logs to TensorBoard under
``OUT/tb/d<depth>_w<width>_lr<lr>``. Written to OUT: ``results.json`` (per run: the
validation curve with train wall-clock per point, and with ``--track-spectral`` the
``||W||_2 / sqrt(fan_out/fan_in)`` band of hidden matrices), ``results.md`` (table of
final validation loss, best lr per width marked) and ``lr_sweep.png`` (final validation
loss vs lr, one line per width and depth; also added to TensorBoard as a figure).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import lightning as L

from optimizers import OPTIMIZERS
from optimizers.muonpp import hidden_spectral_ratios
from scripts.sweep_io import open_sweep
from toolkit import LanguageModel, TextDataModule

ROOT = Path(__file__).resolve().parent.parent


class Recorder(L.Callback):
    """Validation loss per check, with training wall-clock (validation time excluded)."""

    def __init__(self, spectral: bool):
        self.spectral, self.curve, self.train_s, self._t = spectral, [], 0.0, None

    def on_train_start(self, trainer, pl_module):
        if self.spectral:  # the band at initialization, before any update
            self.curve.append({"step": 0, "val_loss": math.nan, "train_s": 0.0,
                               "spectral": self._band(pl_module)})

    @staticmethod
    def _band(pl_module) -> dict:
        r = list(hidden_spectral_ratios(pl_module.model).values())
        return {"min": min(r), "median": sorted(r)[len(r) // 2], "max": max(r)}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train_s += time.perf_counter() - self._t

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        point = {"step": trainer.global_step, "val_loss": float(pl_module.val_loss.compute()),
                 "train_s": round(self.train_s, 2)}
        if self.spectral:
            point["spectral"] = self._band(pl_module)
        self.curve.append(point)


def run_one(args, lr: float, width: int, depth: int, out: Path) -> dict:
    L.seed_everything(args.seed, verbose=False)
    name = f"d{depth}_w{width}_lr{lr:g}"
    kwargs = dict(json.loads(args.opt_kwargs)) if args.opt_kwargs else {}
    model = LanguageModel(block_size=args.block_size, n_layer=depth, n_head=max(1, width // 32),
                          n_embd=width, depth_mup=args.depth_mup, optimizer=args.optimizer, lr=lr,
                          weight_decay=args.weight_decay, optimizer_kwargs=kwargs,
                          warmup_steps=args.warmup, lr_decay="cosine", min_lr_ratio=0.1)
    data = TextDataModule(block_size=args.block_size, batch_size=args.batch_size,
                          val_blocks=args.val_blocks, seed=args.seed)
    rec = Recorder(args.track_spectral)
    logger = L.pytorch.loggers.TensorBoardLogger(out / "tb", name=name, version="",
                                                 default_hp_metric=False)
    trainer = L.Trainer(max_steps=args.steps, val_check_interval=args.val_every,
                        check_val_every_n_epoch=None, limit_val_batches=args.val_batches,
                        log_every_n_steps=25, num_sanity_val_steps=0, logger=logger,
                        callbacks=[rec], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(model, data)
    res = {"name": name, "optimizer": args.optimizer, "lr": lr, "width": width, "depth": depth,
           "weight_decay": args.weight_decay, "opt_kwargs": kwargs, "seed": args.seed,
           "steps": args.steps, "final_val_loss": rec.curve[-1]["val_loss"] if rec.curve else math.nan,
           "wall_s": round(time.perf_counter() - t0, 1), "curve": rec.curve}
    print(f"{name}: final val loss {res['final_val_loss']:.4f} "
          f"(train {rec.train_s:.0f}s)", flush=True)
    return res


def table(results: list[dict]) -> str:
    lrs = sorted({r["lr"] for r in results})
    rows = ["| depth | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
            "|---" * (len(lrs) + 3) + "|"]
    for d, w in sorted({(r["depth"], r["width"]) for r in results}):
        got = {r["lr"]: r["final_val_loss"] for r in results if (r["depth"], r["width"]) == (d, w)}
        best = min(got, key=lambda k: got[k] if math.isfinite(got[k]) else math.inf)
        cells = [("**%.4f**" if lr == best else "%.4f") % got[lr] if lr in got else "-" for lr in lrs]
        rows.append(f"| {d} | {w} | " + " | ".join(cells) + f" | {best:g} |")
    return "\n".join(rows)


def plot(results: list[dict], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for d, w in sorted({(r["depth"], r["width"]) for r in results}):
        pts = sorted((r["lr"], r["final_val_loss"]) for r in results
                     if (r["depth"], r["width"]) == (d, w))
        ax.plot(*zip(*pts), marker="o", label=f"width {w}, depth {d}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final validation loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZERS))
    ap.add_argument("--lrs", type=float, nargs="+", required=True)
    ap.add_argument("--widths", type=int, nargs="+", default=[128])
    ap.add_argument("--depths", type=int, nargs="+", default=[4])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--val-every", type=int, default=100)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--val-blocks", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--opt-kwargs", default="", help='JSON, e.g. \'{"adam_lr": 0.01}\'')
    ap.add_argument("--depth-mup", action="store_true", help="residual branches x 1/sqrt(2L)")
    ap.add_argument("--track-spectral", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", default="runs/sweeps/default")
    args = ap.parse_args(argv)
    out, results_path, results = open_sweep(args.out, args.threads, [])
    done = {r["name"] for r in results}
    for d in args.depths:
        for w in args.widths:
            for lr in args.lrs:
                if f"d{d}_w{w}_lr{lr:g}" in done:  # rerunning the command resumes the grid
                    continue
                results.append(run_one(args, lr, w, d, out))
                results_path.write_text(json.dumps(results, indent=1))
    title = f"{args.optimizer}, {args.steps} steps"
    md = f"# {title}\n\nFinal validation loss (seed {args.seed}).\n\n{table(results)}\n"
    (out / "results.md").write_text(md)
    print(md)
    fig = plot(results, title)
    fig.savefig(out / "lr_sweep.png", dpi=100)
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(out / "tb" / "summary")) as tb:
        tb.add_figure("lr_sweep/final_val_loss_vs_lr", fig)
        tb.add_text("lr_sweep/table", table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
