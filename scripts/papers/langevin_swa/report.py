"""Summaries of the single-index sweep (scripts/papers/langevin_swa/single_index.py): fitted slopes, the
n* table of docs/langevin_swa.md, the overlap plot, and the values in docs/results."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

THRESHOLDS = (0.5, 0.8)


def slope(ds: list[int], n_stars: list[float | None]) -> float | None:
    pts = [(math.log(d), math.log(n)) for d, n in zip(ds, n_stars) if n is not None]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def summarize(sweep: dict) -> dict:
    summary = {}
    for k, per_d in sorted(sweep.items()):
        ds = sorted(per_d, key=int)
        for name in per_d[ds[0]]["methods"]:
            for level in THRESHOLDS:
                stars = [per_d[d]["methods"][name][f"n_star_{level}"] for d in ds]
                summary[f"k{k}_{name}_{level}"] = {"n_star": dict(zip(ds, stars)),
                                                   "slope": slope([int(d) for d in ds], stars)}
    return summary


def table(raw: dict) -> str:
    """Markdown: n*(d) at each bar per k* and estimator, with the fitted slope."""
    rows = []
    for k, per_d in sorted(raw["sweep"].items()):
        ds = sorted(per_d, key=int)
        rows += [(f"\n**k\\* = {k}** (paper: average {int(k) / 2:g}, last iterate and online SGD "
                  f"{max(1, int(k) - 1)})\n"), "| estimator | bar | " + " | ".join(f"n* (d={d})" for d in ds)
                 + " | slope |", "| --- | --- | " + " | ".join("---" for _ in ds) + " | --- |"]
        for name in per_d[ds[0]]["methods"]:
            for level in THRESHOLDS:
                s = raw["summary"][f"k{k}_{name}_{level}"]
                cells = [f"{s['n_star'][d]:.0f}" if s["n_star"][d] else "not reached" for d in ds]
                sl = "n/a" if s["slope"] is None else f"{s['slope']:.2f}"
                rows.append(f"| {name} | {level} | " + " | ".join(cells) + f" | {sl} |")
    return "\n".join(rows)


def plot(sweep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = sorted(sweep, key=int)
    fig, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4.2), squeeze=False)
    styles = {"avg": "-", "avg2": "-.", "last": "--", "sgd": ":"}
    for ax, k in zip(axes[0], ks):
        cmap = plt.get_cmap("viridis")
        ds = sorted(sweep[k], key=int)
        for i, d in enumerate(ds):
            r = sweep[k][d]
            for name, m in r["methods"].items():
                ns = r["sgd_n"] if name == "sgd" else r["n"]
                x = np.array(ns) / int(d) ** (int(k) / 2)
                ax.plot(x, m["curve_0.8"], styles[name], color=cmap(i / max(1, len(ds) - 1)),
                        label=f"{name} d={d}")
        for level in THRESHOLDS:
            ax.axhline(level, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel(f"n / d^(k*/2)   (k* = {k})")
        ax.set_ylabel("median |<theta_hat, theta*>| over 10 seeds")
        ax.set_title(f"k* = {k}: avg (solid), avg2 (dash-dot), last (dashed), online SGD (dotted)",
                     fontsize=8)
        ax.legend(fontsize=5, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def record_slopes(raw: dict) -> None:
    """The fitted exponents into docs/results/langevin_swa_single_index.json (2 decimals;
    "none" where a method never reached the bar at two dimensions)."""
    from scripts.results import record
    values = {}
    for key, s in raw["summary"].items():
        k, name, level = key.split("_")
        values[f"{k}_{name}_{int(float(level) * 100)}"] = (
            "none" if s["slope"] is None else round(s["slope"], 2))
    values["dims_k3"] = "/".join(sorted(raw["sweep"].get("3", {}), key=int))
    values["dims_k4"] = "/".join(sorted(raw["sweep"].get("4", {}), key=int))
    record("langevin_swa_single_index", values)
