"""Plots of generated trajectories for scripts.papers.mfld_trajectories.sweep: particle paths (the SDE data)
and marginals at every time against the truth (the digit shapes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_paths(Z: dict[str, np.ndarray], truth: np.ndarray, path: Path) -> None:
    """First 40 paths (read by particle index) of the truth and of each generated run."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(Z) + 1, figsize=(3.3 * (len(Z) + 1), 3.3), sharex=True, sharey=True)
    for p in truth[:40]:
        axes[0].plot(p[:, 0], p[:, 1], lw=0.6, alpha=0.6)
    axes[0].set_title("true SDE paths")
    for ax, (name, z) in zip(axes[1:], Z.items()):
        for p in z[:40]:
            ax.plot(p[:, 0], p[:, 1], lw=0.6, alpha=0.6)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_marginals(Z: dict[str, np.ndarray], truth: np.ndarray, times: np.ndarray, held_out: list[int],
                   path: Path) -> None:
    """One row per run (the truth first), one column per time; held-out times in red titles.
    Grey lines link each particle's positions at consecutive times."""
    plt = _plt()
    rows = {"truth (500 samples)": truth, **Z}
    fig, axes = plt.subplots(len(rows), len(times), figsize=(1.45 * len(times), 1.5 * len(rows)),
                             sharex=True, sharey=True)
    lo, hi = truth.min((0, 1)) - 0.3, truth.max((0, 1)) + 0.3
    for r, (name, z) in enumerate(rows.items()):
        for s, t in enumerate(times):
            ax = axes[r, s]
            if r > 0 and s > 0:
                for p in z[:, s - 1:s + 1]:
                    axes[r, s - 1].plot(p[:, 0], p[:, 1], color="0.8", lw=0.4, zorder=0)
            ax.scatter(z[:, s, 0], z[:, s, 1], s=2 if r == 0 else 5, color="k" if r == 0 else "C0")
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t={t:.2f}" + (" (held out)" if s in held_out else ""), fontsize=7,
                             color="C3" if s in held_out else "k")
        axes[r, 0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
