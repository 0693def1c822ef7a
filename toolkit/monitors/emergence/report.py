"""Tables and plots of per-layer emergence-law fits (:mod:`toolkit.monitors.emergence`,
Gallego-Feliciano et al. 2025, Eq. 1) for the massive-activation monitor and
``scripts/papers/massive_activations/fit.py``."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def by_layer(rows: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(int(r["layer"]), []).append((r["step"], r["ratio"]))
    return {i: tuple(np.array(v, dtype=float).T) for i, v in sorted(out.items())}


def _iv(v: tuple | None) -> str:
    if v is None:
        return "-"
    return "[" + ", ".join(f"{x:.3g}" if math.isfinite(x) else ("inf" if x > 0 else "-inf")
                           for x in v) + "]"


def summary_table(rows: list[dict], fits: dict) -> str:
    """Two lines per layer: the measured curve (ratio at start/end, where the top-1 sits)
    with the fitted parameters and R^2; then the predictions with their bootstrap
    intervals (steady state K, peak step, r at horizon x the last step) and the verdict,
    ``NOT IDENTIFIABLE`` with its reason where the window cannot determine them."""
    lines = [f"{'layer':>5} {'ratio0':>9} {'ratio_end':>9} {'top1_end':>9} {'(tok,dim)':>10} "
             f"{'massive':>7} | {'A':>9} {'lambda':>9} {'gamma':>9} {'t0':>9} {'K':>9} {'R^2':>6}"]
    for i in sorted({int(r["layer"]) for r in rows}):
        mine = [r for r in rows if int(r["layer"]) == i]
        a, b = mine[0], mine[-1]
        line = (f"{i:>5} {a['ratio']:9.1f} {b['ratio']:9.1f} {b['top1']:9.2f} "
                f"{'(%d,%d)' % (b['token'], b['dim']):>10} {bool(b['massive'])!s:>7} |")
        f = fits.get(i)
        if f is None:
            lines.append(line + " (too few points to fit)")
            continue
        lines.append(line + " " + " ".join(f"{v:9.3g}" for v in f.params) + f" {f.r2:6.3f}")
        iv = f.intervals
        h = f.horizon * f.t_max
        verdict = "identifiable" if f.identifiable else f"NOT IDENTIFIABLE ({f.reason})"
        lines.append(f"{'':>5} predictions ({f.level:.0%} bootstrap): steady {f.steady:.3g} "
                     f"{_iv(iv.get('steady'))}, peak step {f.peak_step:.4g} "
                     f"{_iv(iv.get('peak_step'))}, r({h:.0f}) {float(f(h)):.3g} "
                     f"{_iv(iv.get('horizon'))}: {verdict}")
    return "\n".join(lines)


def plot_history(rows: list[dict], fits: dict, folder: str | Path) -> dict:
    """``massive_ratio.png`` (ratio vs step per layer with the fitted curve, its prediction
    to ``horizon`` x the window with the bootstrap band, dotted and grey with a red title
    where the fit is not identifiable) and
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
        title, color = f"layer {i}", "black"
        f = fits.get(i)
        if f is not None:
            tt = np.linspace(steps.min(), steps.max(), 200)
            ax.plot(tt, f(tt), "-", label=f"fit R²={f.r2:.3f}")
            if f.samples is not None:  # extrapolation to horizon x the window, 90% band
                ahead = np.linspace(steps.max(), f.horizon * f.t_max, 100)
                lo, hi = f.interval(ahead)
                style = "-" if f.identifiable else ":"
                ax.plot(ahead, f(ahead), style, color="C2", label="prediction")
                ax.fill_between(ahead, lo, hi, color="C2" if f.identifiable else "0.6",
                                alpha=0.3, lw=0, label=f"{f.level:.0%} bootstrap")
                ax.axvline(steps.max(), color="0.5", lw=0.6)
                if not f.identifiable:
                    title, color = f"layer {i}: NOT IDENTIFIABLE", "red"
        ax.set_title(title, fontsize=9, color=color)
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
