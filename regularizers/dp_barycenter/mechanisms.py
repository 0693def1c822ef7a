"""The two private barycenter routes of Gu, Kunapuli, Bun, Chien & Greenewald, "Differentially
Private Wasserstein Barycenters" (arXiv 2510.03021): output perturbation and private coresets.
Pure numpy + POT; ``core.dp_barycenter`` checks the input and writes the report.

Data are clipped to a public ball B(c, R) first; every bound below is for the clipped data.
Adjacency: one point of one measure replaced (measure sizes are public).
"""
from __future__ import annotations

import numpy as np
import ot


def clip_to_ball(x: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Project each row of ``x`` onto the ball B(center, radius)."""
    v = x - center
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return center + v * np.minimum(1.0, radius / np.maximum(norm, 1e-300))


def public_init(k: int, d: int, center: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """k points uniform in the public ball: a starting support that depends on no data."""
    g = rng.standard_normal((k, d))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return center + radius * g * rng.random((k, 1)) ** (1.0 / d)


def projection_step(X: np.ndarray, locations: list[np.ndarray], weights: list[np.ndarray],
                    lambdas: np.ndarray) -> np.ndarray:
    """One free-support barycenter update (Cuturi & Doucet 2014, Alg. 2; the loop body of
    ``ot.lp.free_support_barycenter``): X_j <- sum_i lambda_i Y^i_j, where Y^i_j is the
    barycentric projection of atom j under the exact OT plan from uniform atoms X to measure i.

    Each Y^i_j is divided by its plan row's actual mass (not the nominal 1/k) so that it is a
    convex combination of measure i's points; a solver that stops short of optimality is an
    error, since the sensitivity bound below holds for optimal plans only.
    """
    k = len(X)
    b = np.full(k, 1.0 / k)
    out = np.zeros_like(X)
    for loc, w, lam in zip(locations, weights, lambdas):
        plan, log = ot.emd(b, w, ot.dist(X, loc), numItermax=10_000_000, log=True)
        if log["warning"] is not None:
            raise RuntimeError(f"ot.emd did not reach an optimal plan ({log['warning']})")
        row = plan.sum(1, keepdims=True)
        out += lam * (plan @ loc) / np.maximum(row, 1e-300)
    return out


def output_sensitivity(radius: float, k: int, lambdas: np.ndarray, sizes: np.ndarray) -> float:
    """Replace-one L2 sensitivity of :func:`projection_step` at a public support X:

        ||X(D) - X(D')||_F <= max_i lambda_i * 2 R k^{3/2} / n_i   for almost every X.

    Derivation. Replacing point x_l of measure i (mass 1/n_i) by x'_l changes only measure i's
    plan. Let P, P' be the optimal plans before and after, on the union of both point sets.
    P' - P has zero row sums and column sums -1/n_i at x_l, +1/n_i at x'_l, so it decomposes
    conformally into paths x_l -> atom -> point -> ... -> x'_l carrying 1/n_i in total, plus
    cycles. A cycle avoids both changed columns, so its cost is the same for D and D'; the
    optimality of P and of P' then forces it to cost 0, i.e. P + t*cycle is another optimum
    for D, which is impossible when D's plan is unique. A path through atom j uses two
    entries of row j, so sum_l |P'-P|_jl <= 2/n_i, and with zero row sums and all points in
    B(c, R): |Y'^i_j - Y^i_j| = k |sum_l (P'-P)_jl (x_l - c)| <= 2 R k / n_i for each of the
    k atoms. Uniqueness: a zero-cost cycle through distinct points is an affine hyperplane
    in X (the |X_j|^2 terms cancel), and duplicate points leave Y unchanged, so the plan is
    unique (up to duplicates) for Lebesgue-almost every X. The support X is always drawn with
    a density (a uniform start, then every update plus Gaussian noise), so the bound fails
    only on an event of probability 0 under both D and D' and the Gaussian mechanisms
    compose as usual. Exact ties at an adversarial X do break it (the test suite shows a pair);
    floating-point near-ties are the usual caveat of implementing a real-valued mechanism.
    """
    return float(2.0 * radius * k ** 1.5 * np.max(np.asarray(lambdas) / np.asarray(sizes)))


def output_perturbation(locations, weights, lambdas, k, center, radius, n_iter, noise_std,
                        rng: np.random.Generator) -> np.ndarray:
    """``n_iter`` free-support updates from a public random start, each released with Gaussian
    noise: every plan is computed against a support that is already public and has a density,
    which is what :func:`output_sensitivity` needs. The ``n_iter`` releases are composed by the
    accountant."""
    X = public_init(k, locations[0].shape[1], center, radius, rng)
    for _ in range(n_iter):
        X = projection_step(X, locations, weights, lambdas)
        if noise_std > 0:
            X = X + noise_std * rng.standard_normal(X.shape)
    return X


def jl_matrix(d: int, proj_dim: int, seed: int) -> np.ndarray:
    """Public Johnson-Lindenstrauss map x -> x P, P with N(0, 1/proj_dim) entries (depends only
    on the seed), so squared distances are preserved in expectation."""
    return np.random.default_rng(seed).standard_normal((d, proj_dim)) / np.sqrt(proj_dim)


def grid_counts(x: np.ndarray, center: np.ndarray, radius: float, bins: int) -> np.ndarray:
    """Number of points in each of the ``bins``^d cells of the public grid over the cube
    [c - R, c + R]^d (row-major cell order)."""
    d = x.shape[1]
    idx = np.clip(np.floor((x - center + radius) / (2 * radius / bins)).astype(np.int64), 0, bins - 1)
    flat = np.ravel_multi_index(idx.T, (bins,) * d)
    return np.bincount(flat, minlength=bins ** d).astype(np.float64)


def noisy_counts(x, center, radius, bins, noise_std, rng: np.random.Generator) -> np.ndarray:
    """:func:`grid_counts` plus N(0, noise_std^2) on every cell: the coreset route's only
    access to the data."""
    counts = grid_counts(x, center, radius, bins)
    return counts + noise_std * rng.standard_normal(counts.shape) if noise_std > 0 else counts


# Replacing one point moves it from one cell to another: -1 in one count, +1 in another.
HISTOGRAM_SENSITIVITY = float(np.sqrt(2.0))


def private_coreset(x: np.ndarray, center: np.ndarray, radius: float, bins: int, noise_std: float,
                    threshold: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Weighted cell centres from noisy grid counts (the private-coreset route, Gaussian noise).

    Noise goes on every cell of the public grid, empty ones included, so which cells survive
    the ``threshold`` is post-processing. Returns (locations, weights summing to 1).
    """
    counts = noisy_counts(x, center, radius, bins, noise_std, rng)
    keep = counts > threshold
    if not keep.any():  # all noise: fall back to the single largest noisy count
        keep = counts == counts.max()
    cells = np.flatnonzero(keep)
    w = np.maximum(counts[cells], 1e-12)
    idx = np.array(np.unravel_index(cells, (bins,) * len(center))).T
    locs = center - radius + (idx + 0.5) * (2 * radius / bins)
    return locs, w / w.sum()
