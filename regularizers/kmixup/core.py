"""k-mixup by optimal transport, and mixup as its k = 1 case. Pure torch + POT/scipy.

k-mixup (Greenewald, Gu, Yurochkin, Solomon, Chien, "k-Mixup Regularization for Deep
Learning via Optimal Transport", Sec. 3): take two disjoint sets of k examples, match them
by the optimal transport plan between their uniform empirical measures (Eq. 2 -- with equal
weights the plan is a permutation, so OT reduces to an assignment problem), draw one
lambda ~ Beta(alpha, alpha) and interpolate inputs and one-hot labels along matched pairs
(displacement interpolation, Eq. 3). With k = 1 the matching is trivial: mixup (Zhang et
al., 2018), x~ = lam x_i + (1 - lam) x_j.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment
from scipy.special import betaincinv

COSTS = ("sqeuclidean", "euclidean")
SOLVERS = ("lsa", "emd")


def pairwise_cost(a: torch.Tensor, b: torch.Tensor, cost: str = "sqeuclidean",
                  a_sq: torch.Tensor | None = None, b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Cost matrices between matched sets ``a`` (..., k, d) and ``b`` (..., k, d).

    "sqeuclidean" is the paper's W2 ground cost; "euclidean" is what the authors' code uses.
    ``a_sq``/``b_sq`` are the squared row norms, when the caller has them already.
    """
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; choose one of {COSTS}")
    a, b = a.float(), b.float()
    a_sq = torch.linalg.vector_norm(a, dim=-1).square() if a_sq is None else a_sq
    b_sq = torch.linalg.vector_norm(b, dim=-1).square() if b_sq is None else b_sq
    # |a|^2 + |b|^2 - 2 a.b in one batched matmul: far faster than cdist on many small blocks;
    # its rounding (~1e-6 relative) is far below the gaps between distinct matchings' costs.
    d2 = torch.baddbmm((a_sq.unsqueeze(-1) + b_sq.unsqueeze(-2)).reshape(-1, *a_sq.shape[-1:], b_sq.shape[-1]),
                       a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]).transpose(-1, -2),
                       alpha=-2).reshape(*a.shape[:-1], b.shape[-2]).clamp(min=0)
    return d2 if cost == "sqeuclidean" else d2.sqrt()


def assignment(cost: torch.Tensor | np.ndarray, solver: str = "lsa") -> np.ndarray:
    """Optimal permutation(s) for cost matrices of shape (k, k) or (m, k, k): row i of
    problem j goes to column ``perm[j, i]``.

    "lsa" is scipy's exact linear_sum_assignment; "emd" is POT's exact network simplex
    (``ot.emd``) on uniform weights, whose vertex solution is a permutation matrix / k.
    Both are exact; "lsa" is the faster one (see the ``kmixup-step`` benchmark).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    c = cost.detach().cpu().double().numpy() if torch.is_tensor(cost) else np.asarray(cost, np.float64)
    single = c.ndim == 2
    c = c[None] if single else c
    out = np.empty(c.shape[:2], dtype=np.int64)
    for j, cj in enumerate(c):
        if solver == "lsa":
            out[j] = linear_sum_assignment(cj)[1]
        else:
            k = cj.shape[0]
            w = np.full(k, 1.0 / k)
            out[j] = ot.emd(w, w, np.ascontiguousarray(cj)).argmax(1)
    return out[0] if single else out


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """lam ~ Beta(alpha, alpha) by inverting the Beta CDF at a uniform draw of ``generator``,
    so one torch generator drives the permutation and lambda alike."""
    if not alpha > 0:
        raise ValueError(f"alpha={alpha} must be > 0 (lambda ~ Beta(alpha, alpha))")
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return float(betaincinv(alpha, alpha, u))


def kmixup_partners(x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                    cost: str = "sqeuclidean", features: torch.Tensor | None = None,
                    solver: str = "lsa") -> torch.Tensor:
    """Index of each example's mixing partner: ``x[i]`` is mixed with ``x[partner[i]]``.

    The batch is shuffled with ``generator`` and cut into m = n // k blocks B_0..B_{m-1};
    block B_j is matched by OT against the *next* block B_{(j+1) mod m}, a different and
    disjoint set (matching a block against a set that overlaps it would pair shared points
    with themselves). So m >= 2: k must be at most n // 2.

    Batch sizes not divisible by k: the r = n mod k leftover examples (a fresh random subset
    every batch, since the shuffle comes first) form one extra block of size r, matched by OT
    against the first r examples of B_0 -- k-mixup with block size r for them. Every example
    is mixed; partners are never the example itself nor in its own block.

    ``features`` (n, ...) replaces ``x`` as the space the cost is measured in (manifold
    k-mixup: a layer's activations), the interpolation itself stays in input space.
    """
    n = x.shape[0]
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    if 2 * k > n:
        raise ValueError(f"k={k} is too large for a batch of {n}: each k-block is matched against "
                         f"a different, disjoint k-block of the same batch, so k <= batch//2 = "
                         f"{n // 2}. Lower k or raise the batch size.")
    f = x if features is None else features
    if f.shape[0] != n:
        raise ValueError(f"features have {f.shape[0]} rows for a batch of {n}")
    f = f.detach().reshape(n, -1).float()
    sq = torch.linalg.vector_norm(f, dim=1).square() if k > 1 else None
    order = torch.randperm(n, generator=generator).to(x.device)
    m, r = divmod(n, k)
    blocks = order[:m * k].view(m, k)
    nxt = blocks.roll(-1, dims=0)
    partner = torch.empty(n, dtype=torch.long, device=x.device)
    if k == 1:  # nothing to match: a random cyclic derangement, i.e. mixup
        partner[blocks[:, 0]] = nxt[:, 0]
    else:
        perm = assignment(pairwise_cost(f[blocks], f[nxt], cost, sq[blocks], sq[nxt]), solver)
        perm = torch.as_tensor(perm, device=x.device)
        partner[blocks] = torch.gather(nxt, 1, perm)
    if r:
        rest, target = order[m * k:], blocks[0, :r]
        perm = torch.as_tensor(assignment(pairwise_cost(f[rest], f[target], cost, sq[rest],
                                                        sq[target]), solver),
                               device=x.device)
        partner[rest] = target[perm]
    return partner


def soft_targets(y: torch.Tensor, num_classes: int | None = None, check_values: bool = True
                 ) -> torch.Tensor:
    """Probability rows (n, C) from class indices (n,) or probability rows, with clear errors.

    ``check_values=False`` skips the checks that read values (index range, rows summing to
    1): each is a host sync on a GPU, so the callbacks check the first batch of a fit only.
    Shapes and dtypes are always checked."""
    if y.is_floating_point():
        if y.ndim != 2:
            raise ValueError(f"float targets of shape {tuple(y.shape)} are neither class indices "
                             "(int, shape N) nor probability rows (float, shape N x C)")
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"soft targets have {y.shape[1]} columns but num_classes={num_classes}")
        if not check_values:
            return y
        if (y < 0).any() or not torch.allclose(y.sum(1), torch.ones_like(y[:, 0]), atol=1e-4):
            raise ValueError("soft targets must be probability rows: non-negative, summing to 1")
        return y
    if y.dtype in (torch.bool, torch.complex64, torch.complex128) or y.ndim != 1:
        raise ValueError(f"targets of dtype {y.dtype} and shape {tuple(y.shape)} are neither class "
                         "indices (int, shape N) nor probability rows (float, shape N x C)")
    if num_classes is None:
        raise ValueError("unknown number of classes for integer targets: pass num_classes")
    if check_values and len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"class indices span [{int(y.min())}, {int(y.max())}], outside "
                         f"[0, {num_classes}) for num_classes={num_classes}")
    return torch.nn.functional.one_hot(y.long(), num_classes).float()


def mix(x: torch.Tensor, y: torch.Tensor, partner: torch.Tensor, lam: float,
        num_classes: int | None = None, check_values: bool = True
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacement interpolation along the pairs: lam * own + (1 - lam) * partner's."""
    t = soft_targets(y, num_classes, check_values)
    t = t.to(x.dtype if x.is_floating_point() else torch.float32)
    return lam * x + (1 - lam) * x[partner], lam * t + (1 - lam) * t[partner]


def kmixup_batch(x: torch.Tensor, y: torch.Tensor, k: int, alpha: float,
                 num_classes: int | None = None, generator: torch.Generator | None = None,
                 cost: str = "sqeuclidean",
                 features: torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 solver: str = "lsa", check_values: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """k-mixup of one batch: mixed inputs (same shape as ``x``) and soft targets (n, C).

    ``y`` holds class indices (needs ``num_classes``) or probability rows. ``generator``
    draws, in this order, the block shuffle (:func:`kmixup_partners`, whose docstring says how
    blocks are formed and how n not divisible by k is handled) and lambda. ``features`` is a
    tensor or a callable ``x -> features`` measuring the matching cost (manifold k-mixup).
    """
    t = soft_targets(y, num_classes, check_values)  # validate before spending time on matching
    if callable(features):
        with torch.no_grad():
            features = features(x)
    partner = kmixup_partners(x, k, generator, cost, features, solver)
    return mix(x, t, partner, sample_lambda(alpha, generator), check_values=False)


def mixup_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, num_classes: int | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., 2018): :func:`kmixup_batch` with k = 1, each example mixed with a
    random partner other than itself."""
    return kmixup_batch(x, y, 1, alpha, num_classes, generator)
