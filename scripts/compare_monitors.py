"""Plot monitor curves of several runs side by side (e.g. AdamW vs Muon of one recipe).

    python -m scripts.compare_monitors runs/massive_activations_lm/version_0 \
        runs/massive_activations_lm_muon/version_0 --labels adamw muon --out monitors_compare.png

Reads the TensorBoard events of each run folder; prints each indicator at a few steps
and draws one panel per indicator.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_TAGS = ("stability/attn_z/max", "stability/logit_z", "stability/attn_rms/mean",
                "stability/mlp_rms/mean", "stability/outlier_pct/max", "massive/ratio/max",
                "spectral/W/max", "spectral/dW/mean", "train/loss")


def scalars(run: str | Path, tags) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags()["scalars"])
    if not have:
        raise FileNotFoundError(f"no TensorBoard scalars under {run}: give a run folder "
                                "such as runs/<recipe>/version_0")
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in have}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--labels", nargs="*")
    ap.add_argument("--tags", nargs="*", default=list(DEFAULT_TAGS))
    ap.add_argument("--out", default="monitors_compare.png")
    ap.add_argument("--at", nargs="*", type=int, default=None, help="steps for the printed table")
    args = ap.parse_args(argv)
    labels = args.labels or [Path(r).parent.name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error("give one label per run")
    data = {lab: scalars(r, args.tags) for lab, r in zip(labels, args.runs)}
    tags = [t for t in args.tags if any(t in d for d in data.values())]
    for t in tags:
        print(f"== {t}")
        for lab, d in data.items():
            pts = dict(d.get(t, []))
            steps = args.at or sorted(pts)[:: max(1, len(pts) // 6)]
            print(f"  {lab:<10}" + " ".join(f"{s}:{pts[s]:.4g}" for s in steps if s in pts))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = 3
    rows = -(-len(tags) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, t in zip(axes.flat, tags):
        for lab, d in data.items():
            if t in d:
                s, v = zip(*d[t])
                ax.plot(s, v, label=lab, lw=1.2)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tags):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return data


if __name__ == "__main__":
    main()
