"""Emergence law of massive activations (Gallego-Feliciano et al. 2025, "Hidden Dynamics
of Massive Activations in Transformer Training", Eq. 1):

    r(t) = A * exp(-lambda * x) * log(x) + K,   x = gamma * t + t0,

for the ratio r = max|h| / median|h| of one layer at training step t. lambda = 0 leaves pure
logarithmic growth A*log(gamma*t + t0) + K; lambda > 0 gives a rise, a peak where
x*log(x) = 1/lambda (x_peak = exp(W(1/lambda)), W the Lambert function), then decay to K.

Domain (``LOWER``/``UPPER``), from the law and the paper's reading of its parameters
(A the amplitude of the emergent rise, lambda its decay rate, gamma and t0 the time map,
K the baseline the ratio settles to):
  * K >= 1: for lambda > 0, K = lim r(t) is the long-run ratio, and max|h| >= median|h|.
  * A >= 0: the emergence term is a surplus over the baseline that rises and decays; A < 0
    is the law's mirror image (a dip below K), and it is what made free fits cancel a huge
    A against a huge negative K (A = 859, K = -831 on the recipe run: issue 19).
  * lambda >= 0: lambda < 0 makes the term grow like exp(|lambda| x), without bound.
  * gamma > 0, t0 > 0: log(x) needs x > 0, and x must advance with t. t0 < 1 is allowed
    (log x < 0 early: the ratio may start below K); r(0) >= 1 is left to the data at t = 0.
The upper limits (lambda <= 1e3, rescaled gamma <= 1e5, t0 <= 1e4) only keep exp and log
finite; a fit on them is reported (``at_bound``).

The fit is a variable projection: A and K enter linearly, so on a grid over the shape
(t0, gamma, lambda) each point gets its exact bounded least-squares (A, K); the best grid
points (multi-start) are refined on all five parameters by trust-region reflective least
squares within the bounds. Identifiability (:mod:`.emergence_boot`): a moving-block residual
bootstrap refits every replicate from its own best grid point, and gives percentile
intervals for the parameters and for the predictions (steady state, peak step, r at
``horizon`` x the last step). ``identifiable`` is True only if the peak lies inside the
window in at least ``level`` of the replicates and the steady-state and extrapolation
intervals are within +-``rtol`` of the estimates.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.special import lambertw

PARAMS = ("A", "lam", "gamma", "t0", "K")
LOWER = np.array([0.0, 0.0, 1e-9, 1e-9, 1.0])
UPPER = np.array([np.inf, 1e3, 1e5, 1e4, np.inf])  # gamma in rescaled time (t / t_max)


def emergence_law(t, A: float, lam: float, gamma: float, t0: float, K: float) -> np.ndarray:
    x = gamma * np.asarray(t, dtype=float) + t0
    return A * np.exp(-lam * x) * np.log(x) + K


def peak_step(lam, gamma, t0):
    """Step of the maximum of the law (A > 0): x log x = 1/lambda. inf for lambda = 0;
    negative when the peak precedes t = 0 (the curve only decays). Vectorized."""
    lam, gamma, t0 = (np.asarray(v, dtype=float) for v in (lam, gamma, t0))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        x_peak = np.exp(lambertw(1.0 / lam).real)
    return np.where(lam > 0, (x_peak - t0) / gamma, np.inf)


@dataclass
class EmergenceFit:
    """Fitted law with bootstrap intervals. ``intervals`` maps each parameter and the
    derived predictions ("steady" = K when lambda > 0, "peak_step", "horizon") to (lo, hi)
    at ``level``; ``samples`` holds the bootstrap parameters (rows A, lam, gamma, t0, K)."""
    A: float
    lam: float
    gamma: float
    t0: float
    K: float
    r2: float
    n_points: int
    t_max: float = math.nan
    horizon: float = 3.0
    identifiable: bool = False
    reason: str = "no bootstrap"
    level: float = 0.9
    intervals: dict = field(default_factory=dict)
    at_bound: list = field(default_factory=list)
    samples: np.ndarray | None = field(default=None, repr=False)

    def __call__(self, t) -> np.ndarray:
        return emergence_law(t, *self.params)

    @property
    def params(self) -> tuple[float, ...]:
        return self.A, self.lam, self.gamma, self.t0, self.K

    @property
    def steady(self) -> float:
        """Long-run ratio: K when lambda > 0; inf for pure log growth (lambda = 0)."""
        return self.K if self.lam > 0 else math.inf

    @property
    def peak_step(self) -> float:
        return float(peak_step(self.lam, self.gamma, self.t0))

    def interval(self, t, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap interval of r(t) (pointwise)."""
        if self.samples is None:
            raise ValueError("fit without bootstrap (n_boot=0) has no intervals")
        a = (1 - (level or self.level)) / 2
        curves = emergence_law(np.asarray(t, dtype=float)[None], *self.samples.T[..., None])
        return np.quantile(curves, a, axis=0), np.quantile(curves, 1 - a, axis=0)

    def to_dict(self) -> dict:
        """JSON-ready summary (no samples)."""
        d = {k: getattr(self, k) for k in PARAMS + ("r2", "n_points", "t_max", "horizon",
                                                    "identifiable", "reason", "level")}
        d.update(steady=self.steady, peak_step=self.peak_step, at_bound=list(self.at_bound),
                 prediction_step=self.horizon * self.t_max,
                 prediction=float(self(self.horizon * self.t_max)),
                 intervals={k: [float(v[0]), float(v[1])] for k, v in self.intervals.items()})
        fin = lambda v: v if not isinstance(v, float) or math.isfinite(v) else str(v)
        d["intervals"] = {k: [fin(a), fin(b)] for k, (a, b) in d["intervals"].items()}
        return {k: fin(v) for k, v in d.items()}


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("nan"))


def _shape_grid() -> np.ndarray:
    """(lambda, gamma, t0) starts in rescaled time: t0, the span gamma of x over the window,
    and lambda as c / x_end, so that every grid point has a distinct shape on [0, 1]."""
    rows = []
    for t0, g, c in itertools.product(np.logspace(-1, 2, 7), np.logspace(-1, 3, 9),
                                      np.r_[0.0, np.logspace(-1.5, 1.5, 10)]):
        rows.append((c / (t0 + g), g, t0))
    return np.array(rows)


def grid_profile(s: np.ndarray, Y: np.ndarray, grid: np.ndarray):
    """Bounded (A >= 0, K >= 1) least squares for every grid shape and every row of ``Y``
    (B, n), vectorized. Returns sse, A, K, each (G, B)."""
    lam, g, t0 = grid.T[..., None]
    x = g * s + t0
    F = np.exp(-lam * x) * np.log(x)                                   # (G, n)
    n = s.size
    Sf, Sff = F.sum(1)[:, None], (F * F).sum(1)[:, None]
    Sy, Syy, Sfy = Y.sum(1)[None], (Y * Y).sum(1)[None], F @ Y.T       # (1,B) (1,B) (G,B)
    sse = lambda A, K: Syy - 2 * A * Sfy - 2 * K * Sy + A * A * Sff + 2 * A * K * Sf + n * K * K
    varf = np.maximum(Sff - Sf * Sf / n, 1e-300)
    A_u = (Sfy - Sf * Sy / n) / varf
    K_u = (Sy - A_u * Sf) / n
    A_1 = np.maximum((Sfy - Sf) / np.maximum(Sff, 1e-300), 0.0)      # face K = 1
    K_0 = np.broadcast_to(np.maximum(Sy / n, 1.0), A_u.shape)          # face A = 0
    cands = [(A_u, K_u, (A_u >= 0) & (K_u >= 1)), (A_1, np.ones_like(A_1), True),
             (np.zeros_like(A_u), K_0, True)]
    best = np.full(A_u.shape, np.inf)
    A_b, K_b = np.zeros_like(A_u), np.ones_like(A_u)
    for A, K, ok in cands:
        c = np.where(ok, sse(A, K), np.inf)
        take = c < best
        best, A_b, K_b = np.where(take, c, best), np.where(take, A, A_b), np.where(take, K, K_b)
    return best, A_b, K_b


def _model(p, s):
    A, lam, g, t0, K = p
    x = g * s + t0
    return A * np.exp(-lam * x) * np.log(x) + K


def _jac(p, s):
    A, lam, g, t0, K = p
    x = g * s + t0
    e, log = np.exp(-lam * x), np.log(x)
    dx = A * e * (1 / x - lam * log)
    return np.stack([e * log, -A * x * e * log, dx * s, dx, np.ones_like(x)], 1)


def refine(s, y, p0, max_nfev: int = 200):
    """trf least squares on all five parameters (rescaled time) within ``LOWER``/``UPPER``."""
    p0 = np.clip(np.asarray(p0, dtype=float), LOWER, UPPER)
    return least_squares(lambda p: _model(p, s) - y, p0, jac=lambda p: _jac(p, s),
                         method="trf", bounds=(LOWER, UPPER), x_scale="jac", max_nfev=max_nfev)


def fit_emergence(steps, ratios, min_points: int = 6, n_starts: int = 6, n_boot: int = 100,
                  horizon: float = 3.0, level: float = 0.9, rtol: float = 0.08,
                  block: int | None = None, seed: int = 0,
                  max_nfev: int = 200) -> EmergenceFit:
    """Fit :func:`emergence_law` to (steps, ratios) within the domain; with ``n_boot`` > 0,
    bootstrap intervals and the ``identifiable`` verdict (:func:`.emergence_boot.bootstrap`:
    ``rtol`` is the largest half-width of the steady-state and horizon intervals relative
    to their estimates; ``block`` the residual block length, default n^(1/3))."""
    t = np.asarray(steps, dtype=float)
    y = np.asarray(ratios, dtype=float)
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    if len(t) < min_points:
        raise ValueError(f"{len(t)} finite points cannot determine the 5 parameters of the "
                         f"emergence law; log at least {min_points} steps (lower every_n_steps)")
    scale = max(float(t.max()), 1.0)
    s = t / scale
    grid = _shape_grid()
    sse, A, K = grid_profile(s, y[None], grid)
    order = np.argsort(sse[:, 0])[:n_starts]
    best = None
    for j in order:  # multi-start: the best few grid shapes, each refined on all five
        res = refine(s, y, [A[j, 0], *grid[j], K[j, 0]], max_nfev)
        if np.isfinite(res.cost) and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise RuntimeError("the emergence-law fit failed from every start")
    p = best.x
    near = np.isclose(p, LOWER, rtol=1e-6, atol=1e-9) | np.isclose(p, UPPER, rtol=1e-6)
    fit = EmergenceFit(p[0], p[1], p[2] / scale, p[3], p[4], r_squared(y, _model(p, s)),
                       len(t), scale, horizon, level=level,
                       at_bound=[PARAMS[i] for i in np.flatnonzero(near)])
    if n_boot > 0:
        from .boot import bootstrap
        bootstrap(fit, s, y, p, grid, n_boot, rtol, block, seed)
    return fit


def fit_history(rows: list[dict], min_points: int = 6, **kw) -> dict[int, EmergenceFit]:
    """Per-layer fits of a monitor history (layers with too few points are left out)."""
    from .report import by_layer
    return {i: fit_emergence(steps, ratios, min_points, **kw)
            for i, (steps, ratios) in by_layer(rows).items() if len(steps) >= min_points}

