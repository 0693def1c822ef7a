"""Emergence law of massive activations (Gallego-Feliciano et al. 2025, "Hidden Dynamics
of Massive Activations in Transformer Training", Eq. 1):

    r(t) = A * exp(-lambda * x) * log(x) + K,   x = gamma * t + t0,

for the ratio r = max|h| / median|h| of one layer at training step t, fitted with
trust-region reflective least squares (``scipy.optimize.least_squares(method="trf")``).
lambda = 0 leaves pure logarithmic growth A*log(gamma*t + t0) + K; lambda > 0 gives a rise,
a peak at x*log(x) = 1/lambda, then decay.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

PARAMS = ("A", "lam", "gamma", "t0", "K")


def emergence_law(t, A: float, lam: float, gamma: float, t0: float, K: float) -> np.ndarray:
    x = gamma * np.asarray(t, dtype=float) + t0
    return A * np.exp(-lam * x) * np.log(x) + K


@dataclass
class EmergenceFit:
    A: float
    lam: float
    gamma: float
    t0: float
    K: float
    r2: float
    n_points: int

    def __call__(self, t) -> np.ndarray:
        return emergence_law(t, self.A, self.lam, self.gamma, self.t0, self.K)

    @property
    def params(self) -> tuple[float, ...]:
        return self.A, self.lam, self.gamma, self.t0, self.K


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("nan"))


def fit_emergence(steps, ratios, min_points: int = 6, n_starts: int = 3,
                  max_nfev: int = 300) -> EmergenceFit:
    """Least-squares fit of :func:`emergence_law` to (steps, ratios).

    Time is rescaled to [0, 1] for conditioning (gamma absorbs the scale back); the
    lowest-cost trf solution over ``n_starts`` grid starts wins.
    """
    t = np.asarray(steps, dtype=float)
    y = np.asarray(ratios, dtype=float)
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    if len(t) < min_points:
        raise ValueError(f"{len(t)} finite points cannot determine the 5 parameters of the "
                         f"emergence law; log at least {min_points} steps (lower every_n_steps)")
    scale = max(float(t.max()), 1.0)
    s = t / scale

    def model(p, s):
        A, lam, g, t0, K = p
        x = g * s + t0
        return A * np.exp(-lam * x) * np.log(x) + K

    def jac(p):
        A, lam, g, t0, K = p
        x = g * s + t0
        e, log = np.exp(-lam * x), np.log(x)
        dx = A * e * (1 / x - lam * log)
        return np.stack([e * log, -A * x * e * log, dx * s, dx, np.ones_like(x)], 1)

    # Stage 1: a coarse grid over the nonlinear (lambda, gamma, t0); A and K enter linearly,
    # so each grid point gets its exact least-squares (A, K) and cost. Stage 2: trf from the
    # best few grid points on all five parameters.
    starts = []
    for lam, g, t0 in itertools.product(np.r_[0.0, np.logspace(-3, 1, 9)],
                                        np.logspace(-1, 4, 11), np.logspace(-1, 1.5, 6)):
        x = g * s + t0
        design = np.stack([np.exp(-lam * x) * np.log(x), np.ones_like(x)], 1)
        (A, K), *_ = np.linalg.lstsq(design, y, rcond=None)
        cost = float(((design @ np.array([A, K]) - y) ** 2).sum())
        if np.isfinite(cost):
            starts.append((cost, [A, lam, g, t0, K]))
    starts.sort(key=lambda c: c[0])
    best = None
    for _, p0 in starts[:n_starts]:
        # Real histories often lie in a flat valley (A and lambda growing together); the
        # cost barely moves there, so a bounded budget keeps the fit at a fraction of a second.
        res = least_squares(lambda p: model(p, s) - y, p0, jac=jac, method="trf",
                            bounds=([-np.inf, 0.0, 1e-9, 1e-9, -np.inf],
                                    [np.inf, np.inf, np.inf, np.inf, np.inf]),
                            x_scale="jac", max_nfev=max_nfev)
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise RuntimeError("the emergence-law fit failed from every start")
    A, lam, g, t0, K = (float(v) for v in best.x)
    return EmergenceFit(A, lam, g / scale, t0, K, r_squared(y, model(best.x, s)), len(t))


def by_layer(rows: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(int(r["layer"]), []).append((r["step"], r["ratio"]))
    return {i: tuple(np.array(v, dtype=float).T) for i, v in sorted(out.items())}


def fit_history(rows: list[dict], min_points: int = 6) -> dict[int, EmergenceFit]:
    """Per-layer fits of a monitor history (layers with too few points are left out)."""
    fits = {}
    for i, (steps, ratios) in by_layer(rows).items():
        if len(steps) >= min_points:
            fits[i] = fit_emergence(steps, ratios, min_points)
    return fits


def summary_table(rows: list[dict], fits: dict[int, EmergenceFit]) -> str:
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


def plot_history(rows: list[dict], fits: dict[int, EmergenceFit], folder: str | Path) -> dict:
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
