"""``dp_barycenter``: a free-support Wasserstein barycenter released under (epsilon, delta)-DP,
after Gu, Kunapuli, Bun, Chien & Greenewald, "Differentially Private Wasserstein Barycenters"
(arXiv 2510.03021), with POT's exact solvers; plus the non-private reference and the cost F.

Setting (the paper's central model): m measures, each the empirical measure of n_i points, one
point per person; a person may appear in one measure only. The release is the support (and
weights) of a k-atom barycenter; privacy is per person under replace-one adjacency, with the
sizes n_i, the radius R, the centre c and all seeds public.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import ot

from toolkit.seeding import derive_seed

from .accounting import gaussian_report, noise_multiplier
from .mechanisms import (HISTOGRAM_SENSITIVITY, clip_to_ball, jl_matrix, output_perturbation,
                         output_sensitivity, private_coreset)

MECHANISMS = ("output", "coreset")
MAX_CELLS = 1 << 20
ADJACENCY = "replace one point of one measure (measure sizes, R, centre, seeds public)"


@dataclass
class DPBarycenter:
    """A private barycenter: ``support`` (k, d) with ``weights`` (k,), in the projected space
    when ``projection`` (d, proj_dim) is set (map new data with ``x @ projection``)."""
    support: np.ndarray
    weights: np.ndarray
    report: dict = field(default_factory=dict)
    projection: np.ndarray | None = None


def _check(measures, n_support, epsilon, delta, mechanism, radius, lambdas, proj_dim):
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism={mechanism!r}: choose one of {MECHANISMS}")
    if len(measures) == 0:
        raise ValueError("measures is empty: pass a list of (n_i, d) point arrays, one per measure")
    arrays = [np.asarray(x, dtype=np.float64) for x in measures]
    for i, x in enumerate(arrays):
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"measure {i} has shape {x.shape}: each measure must be a non-empty "
                             f"(n_i, d) array of points")
        if not np.isfinite(x).all():
            raise ValueError(f"measure {i} holds NaN or inf: drop or impute those points first")
    dims = sorted({x.shape[1] for x in arrays})
    if len(dims) > 1:
        raise ValueError(f"measures have different dimensions {dims}: every measure's points must "
                         f"live in the same R^d")
    if not (isinstance(n_support, (int, np.integer)) and n_support >= 1):
        raise ValueError(f"n_support={n_support!r}: the barycenter needs an integer number of atoms >= 1")
    if not epsilon > 0:
        raise ValueError(f"epsilon={epsilon}: must be > 0 (math.inf releases without noise)")
    total = sum(len(x) for x in arrays)
    if not 0 < delta < 1.0 / total:
        raise ValueError(f"delta={delta}: must lie in (0, 1/n) = (0, {1.0 / total:.3g}) for n = {total} "
                         f"people, or a whole record may leak with probability delta")
    if radius is None or not radius > 0:
        raise ValueError(f"radius={radius}: give the public radius R of a ball around `center` that "
                         f"should hold the data (points outside are clipped onto it); a radius taken "
                         f"from the data itself would not be private")
    if lambdas is not None and (len(lambdas) != len(arrays) or np.any(np.asarray(lambdas) < 0)
                                or not math.isclose(float(np.sum(lambdas)), 1.0, rel_tol=1e-9)):
        raise ValueError("weights must be m non-negative barycentric weights summing to 1, one per measure")
    if proj_dim is not None and not (isinstance(proj_dim, (int, np.integer)) and 1 <= proj_dim):
        raise ValueError(f"proj_dim={proj_dim!r}: the JL target dimension must be an integer >= 1")
    return arrays, dims[0], total


def dp_barycenter(measures: Sequence[np.ndarray], n_support: int, epsilon: float, delta: float,
                  mechanism: str = "output", seed: int = 0, *, radius: float | None = None,
                  center: np.ndarray | None = None, weights: Sequence[float] | None = None,
                  n_iter: int = 3, proj_dim: int | None = None, bins: int | None = None,
                  threshold: float | None = None, accountant: str = "prv") -> DPBarycenter:
    """A k-atom barycenter of ``measures`` released under (epsilon, delta)-DP.

    Points are clipped to the public ball B(center, radius) first. ``proj_dim`` maps them with a
    public Johnson-Lindenstrauss matrix (paper, coreset route) and the barycenter is then that of
    the projected measures. ``epsilon=math.inf`` runs the same algorithm without noise.

    mechanism="output" (the paper's output perturbation, made to hold for the algorithm's actual
    output): from a public random support, ``n_iter`` free-support updates (the loop body of
    POT's ``free_support_barycenter``: exact ``ot.emd`` plans, barycentric projection), each
    released with Gaussian noise. Sensitivity of one update at the public support X
    (derivation in ``mechanisms.output_sensitivity``):

        ||X(D) - X(D')||_F <= max_i lambda_i * 2 R k^{3/2} / n_i    for almost every X,

    since replacing one point re-routes at most its own mass 1/n_i along one path through
    the atoms when the plan is unique, and it is unique for almost every X; the support is
    random with a density (uniform start, Gaussian noise after every update), so the exception
    has probability 0. Noising every update, not just the last, is what keeps each plan a
    function of a public support: without it one point could move every later plan of every
    measure and only the diameter bound 2 R sqrt(k) would remain. The accountant composes the
    ``n_iter`` releases.

    mechanism="coreset" (the paper's private-coreset route, Gaussian rather than Laplace noise
    so that the same accountant applies): per measure, counts on a public grid of ``bins``^d
    cells over [c - R, c + R]^d get Gaussian noise (replace-one sensitivity sqrt(2): one count
    -1, one +1; the measures hold disjoint people, so one release covers all of them); cells
    above ``threshold`` (default 2 noise stds) become a weighted point set, and the barycenter
    of those sets (``ot.lp.free_support_barycenter``, 100 iterations) is post-processing. Default
    bins ~ (epsilon n_min / 8)^(1/d), the paper's (epsilon n)^(-1/d) resolution.

    Returns a :class:`DPBarycenter` whose report holds epsilon as computed by
    ``regularizers.dp.accounting.epsilon`` (PRV by default) for the noise actually added.
    """
    arrays, d, total = _check(measures, n_support, epsilon, delta, mechanism, radius, weights, proj_dim)
    m, k = len(arrays), int(n_support)
    lambdas = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, dtype=np.float64)
    center = np.zeros(d) if center is None else np.asarray(center, dtype=np.float64)
    projection = None
    if proj_dim is not None:
        projection = jl_matrix(d, proj_dim, derive_seed(seed, 1))
        arrays, center, d = [x @ projection for x in arrays], center @ projection, proj_dim
    arrays = [clip_to_ball(x, center, radius) for x in arrays]
    rng = np.random.default_rng(derive_seed(seed, 2))
    private = math.isfinite(epsilon)
    common = {"mechanism": mechanism, "adjacency": ADJACENCY, "radius": float(radius),
              "n_support": k, "n_points": total, "measures": m, "dim": d, "proj_dim": proj_dim}

    if mechanism == "output":
        if not (isinstance(n_iter, (int, np.integer)) and n_iter >= 1):
            raise ValueError(f"n_iter={n_iter!r}: the output route needs at least one update")
        sens = output_sensitivity(radius, k, lambdas, np.array([len(x) for x in arrays]))
        z = noise_multiplier(epsilon, delta, n_iter, accountant) if private else 0.0
        X = output_perturbation(arrays, [np.full(len(x), 1.0 / len(x)) for x in arrays], lambdas,
                                k, center, radius, n_iter, z * sens, rng)
        b = np.full(k, 1.0 / k)
        analysis = (f"{n_iter} Gaussian releases of a free-support update at a public random "
                    f"support, sensitivity max_i lambda_i 2R k^1.5/n_i each (holds for almost "
                    f"every support: unique OT plans)")
        releases = n_iter
    else:
        n_min = min(len(x) for x in arrays)
        if bins is None:
            eps_eff = epsilon if private else 1e3
            bins = int(np.clip(np.floor((eps_eff * n_min / 8.0) ** (1.0 / d)), 2, 64))
        if bins ** d > MAX_CELLS:
            raise ValueError(f"the grid would have bins^d = {bins}^{d} cells (> {MAX_CELLS}): give "
                             f"proj_dim (a JL dimension such as 4) or fewer bins")
        z = noise_multiplier(epsilon, delta, 1, accountant) if private else 0.0
        sens = HISTOGRAM_SENSITIVITY
        thr = 2.0 * z * sens if threshold is None else float(threshold)
        cores = [private_coreset(x, center, radius, bins, z * sens, thr, rng) for x in arrays]
        X0 = cores_init(cores, k, lambdas, rng)
        X = ot.lp.free_support_barycenter([c[0] for c in cores], [c[1] for c in cores], X0,
                                          weights=lambdas, numItermax=100)
        b = np.full(k, 1.0 / k)
        analysis = ("one Gaussian release of every measure's grid counts (sensitivity sqrt 2); "
                    "the barycenter of the noisy coresets is post-processing")
        releases = 1
        common.update(bins=int(bins), threshold=thr)
    if private:
        report = gaussian_report(z, releases, sens, delta, accountant, analysis=analysis, **common)
    else:
        report = {"epsilon": math.inf, "delta": float(delta), "noise_multiplier": 0.0,
                  "sensitivity": float(sens), "noise_std": 0.0, "releases": releases,
                  "analysis": "no noise (epsilon = inf): not private", **common}
    return DPBarycenter(np.asarray(X), b, report, projection)


def cores_init(cores, k: int, lambdas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """k start atoms drawn from the pooled private coresets (post-processing only)."""
    locs = np.concatenate([c[0] for c in cores])
    w = np.concatenate([lam * c[1] for c, lam in zip(cores, lambdas)])
    idx = rng.choice(len(locs), size=k, replace=len(locs) < k, p=w / w.sum())
    return locs[idx] + 1e-9 * rng.standard_normal((k, locs.shape[1]))


def barycenter(measures: Sequence[np.ndarray], n_support: int, seed: int = 0, n_init: int = 2,
               n_iter: int = 30, weights: Sequence[float] | None = None) -> np.ndarray:
    """Non-private reference: ``ot.lp.free_support_barycenter`` (uniform atoms) from ``n_init``
    starts sampled from the pooled data, keeping the one of least cost F."""
    arrays = [np.asarray(x, dtype=np.float64) for x in measures]
    m = len(arrays)
    lambdas = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, dtype=np.float64)
    pooled = np.concatenate(arrays)
    rng = np.random.default_rng(derive_seed(seed, 3))
    best, best_cost = None, math.inf
    for _ in range(n_init):
        X0 = pooled[rng.choice(len(pooled), size=n_support, replace=len(pooled) < n_support)]
        X = ot.lp.free_support_barycenter(arrays, [np.full(len(x), 1.0 / len(x)) for x in arrays],
                                          X0.copy(), weights=lambdas, numItermax=n_iter)
        cost = barycenter_cost(X, None, arrays, lambdas)
        if cost < best_cost:
            best, best_cost = X, cost
    return best


def barycenter_cost(support: np.ndarray, weights: np.ndarray | None, measures: Sequence[np.ndarray],
                    lambdas: Sequence[float] | None = None) -> float:
    """F = sum_i lambda_i W2^2(barycenter, measure_i), exact (``ot.emd2``)."""
    k = len(support)
    b = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    lambdas = np.full(len(measures), 1.0 / len(measures)) if lambdas is None else lambdas
    return float(sum(lam * ot.emd2(b, np.full(len(x), 1.0 / len(x)), ot.dist(support, np.asarray(x, float)),
                                   numItermax=1_000_000)
                     for x, lam in zip(measures, lambdas)))
