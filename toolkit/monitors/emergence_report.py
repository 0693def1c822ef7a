"""Tables and plots of per-layer emergence-law fits (:mod:`toolkit.monitors.emergence`,
Gallego-Feliciano et al. 2025, Eq. 1) for the massive-activation monitor and
``scripts/fit_massive.py``."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def by_layer(rows: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(int(r["layer"]), []).append((r["step"], r["ratio"]))
    return {i: tuple(np.array(v, dtype=float).T) for i, v in sorted(out.items())}


def summary_table(rows: list[dict], fits: dict) -> str:
    """One line per layer: ratio at start/end, where the top-1 sits at the end, the fit."""
    lines = [f"{'layer':>5} {'ratio0':>9} {'ratio_end':>9} {'top1_end':>9} {'(tok,dim)':>10} "
             f"{'massive':>7} | {'A':>9} {'lambda':>9} {'gamma':>9} {'t0':>9} {'K':>9} {'R^2':>6}"]
    for i in sorted({int(r["layer"]) for r in rows}):
        mine = [r for r in rows if int(r["layer"]) == i]
        a, b = mine[0], mine[-1]
        line = (f"{i:>5} {a['ratio']:9.1f} {b['ratio']:9.1f} {b['top1']:9.2f} "
                f"{'(%d,%d)' % (b['token'], b['dim']):>10} {bool(b['massive'])!s:>7} |")
        f = fits.get(i)
        line += (" " + " ".join(f"{v:9.3g}" for v in f.params) + f" {f.r2:6.3f}"
                 if f else " (too few points to fit)")
        lines.append(line)
    return "\n".join(lines)


def plot_history(rows: list[dict], fits: dict, folder: str | Path) -> dict:
    """``massive_ratio.png`` (ratio vs step per layer with fitted curves) and
    ``massive_heatmap.png`` (layer x step, log10 ratio). Returns the figures."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    layers = by_layer(rows)
    n = len(layers)
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, (i, (steps, ratios)) in zip(axes.flat, layers.items()):
        ax.plot(steps, ratios, "o", ms=2.5, label="measured")
        if i in fits:
            tt = np.linspace(steps.min(), steps.max(), 200)
            ax.plot(tt, fits[i](tt), "-", label=f"fit R²={fits[i].r2:.3f}")
        ax.set_title(f"layer {i}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("max|h| / median|h|", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(folder / "massive_ratio.png", dpi=120)

    steps = sorted({r["step"] for r in rows})
    grid = np.full((n, len(steps)), np.nan)
    col = {s: j for j, s in enumerate(steps)}
    row = {i: k for k, i in enumerate(layers)}
    for r in rows:
        grid[row[int(r["layer"])], col[r["step"]]] = np.log10(max(r["ratio"], 1e-12))
    heat, ax = plt.subplots(figsize=(7, 0.45 * n + 1.5))
    im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                   extent=(steps[0], steps[-1], -0.5, n - 0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    heat.colorbar(im, ax=ax, label="log10 max|h|/median|h|")
    heat.tight_layout()
    heat.savefig(folder / "massive_heatmap.png", dpi=120)
    return {"ratio": fig, "heatmap": heat}
