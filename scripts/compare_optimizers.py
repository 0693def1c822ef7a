"""Compare lr_sweep runs of several optimizers: validation curves, steps to a target loss,
and the spectral-norm band of hidden matrices.

    python -m scripts.compare_optimizers runs/exp/adamw runs/exp/muon runs/exp/auon \
        runs/exp/muonpp --reference adamw --out docs/figures/optimizers

Reads each folder's ``results.json`` (from scripts/lr_sweep.py), takes each optimizer's
best run (lowest final validation loss), and reports, against the reference optimizer's
best final loss L: the first step where another optimizer's validation loss reaches L
(linear interpolation between validation points) as a fraction of the budget, and the same
for training wall-clock (only meaningful when the runs shared the machine alike). Writes ``OUT.md``, ``OUT_curves.png`` (val loss vs step) and, for
runs recorded with ``--track-spectral``, ``OUT_spectral.png`` (min/max over hidden matrices
of ||W||_2 / sqrt(fan_out/fan_in) vs step).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def crossing(curve: list[dict], target: float, key: str) -> float | None:
    """First ``key`` value (step or train_s) where val loss <= target, interpolated."""
    prev = None
    for pt in (p for p in curve if math.isfinite(p["val_loss"])):
        if pt["val_loss"] <= target:
            if prev is None:
                return pt[key]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - pt["val_loss"])
            return prev[key] + f * (pt[key] - prev[key])
        prev = pt
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--reference", default="adamw")
    ap.add_argument("--out", default="runs/compare")
    args = ap.parse_args(argv)
    runs = [r for f in args.folders for r in json.loads((Path(f) / "results.json").read_text())]
    best: dict[str, dict] = {}
    for r in runs:
        if r["curve"] and (r["optimizer"] not in best
                           or r["final_val_loss"] < best[r["optimizer"]]["final_val_loss"]):
            best[r["optimizer"]] = r
    ref = best[args.reference]
    target = ref["final_val_loss"]
    lines = [f"Reference: {args.reference} lr {ref['lr']:g}, final val loss {target:.4f} after "
             f"{ref['steps']} steps.", "",
             "| optimizer | runs (lr: final val loss) | best final | steps to reference loss | "
             "train-time to reference loss |", "|---|---|---|---|---|"]
    for name, b in best.items():
        tried = ", ".join(f"{r['lr']:g}: {r['final_val_loss']:.4f}" for r in runs
                          if r["optimizer"] == name)
        s, t = crossing(b["curve"], target, "step"), crossing(b["curve"], target, "train_s")
        s_txt = "not reached" if s is None else f"{s:.0f} ({s / b['steps']:.2f}x)"
        t_txt = ("not reached" if t is None else
                 f"{t:.0f}s ({t / ref['curve'][-1]['train_s']:.2f}x of the reference's)")
        lines.append(f"| {name} (lr {b['lr']:g}) | {tried} | {b['final_val_loss']:.4f} | {s_txt} | "
                     f"{t_txt} |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(md)
    print(md)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, b in best.items():
        ax.plot([p["step"] for p in b["curve"]], [p["val_loss"] for p in b["curve"]],
                marker="o", ms=3, label=f"{name} lr {b['lr']:g}")
    ax.axhline(target, color="gray", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}_curves.png", dpi=90)
    spectral = [r for r in runs if r["curve"] and "spectral" in r["curve"][0]]
    if spectral:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in spectral:
            steps = [p["step"] for p in r["curve"]]
            lo = [p["spectral"]["min"] for p in r["curve"]]
            hi = [p["spectral"]["max"] for p in r["curve"]]
            line, = ax.plot(steps, hi, marker="o", ms=3, label=f"{r['optimizer']} lr {r['lr']:g} max")
            ax.plot(steps, lo, ls="--", color=line.get_color(), label=f"{r['optimizer']} min")
        ax.set_xlabel("step")
        ax.set_ylabel("||W||_2 / sqrt(fan_out/fan_in)")
        ax.set_title("hidden matrices: spectral ratio band")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{out}_spectral.png", dpi=90)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
