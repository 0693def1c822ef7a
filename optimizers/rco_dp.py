"""Exact budget-constrained dynamic program: one option per group, maximal total score.

The multiple-choice knapsack step of RCO (Helcig & Alistarh 2026, arXiv 2605.00649, Sec. 3:
"budget-constrained dynamic programming for discrete feasibility"; reference code
``round_with_budget_dp`` / ``budget_constrained_argmax`` in IST-DASLab/RCO). Over integer costs

    V_n(j) = max_k V_{n-1}(j - c_nk) + s_nk,   V_0(0) = 0, V_0(j > 0) = -inf,

the answer is max_{j <= B} V_N(j) (or V_N(B) with ``exact=True``), found in O(N K B) time and
O(N B) memory for the back-pointers. Costs are divided by their greatest common divisor first
(per-layer bit costs k * numel share a large one). Non-integer costs need ``resolution``: they
are multiplied by it and must then be integers, so the program stays exact rather than rounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch

MAX_TABLE = 20_000_000  # N * (B + 1) back-pointers; beyond this the DP takes minutes


@dataclass
class DPResult:
    choice: torch.Tensor  # (N,) option index per group
    score: float          # sum of the chosen scores
    cost: float           # sum of the chosen costs, in the caller's units


def _integer_costs(costs: np.ndarray, budget: float, resolution: float | None):
    scale = 1.0 if resolution is None else float(resolution)
    scaled = costs * scale
    ints = np.rint(scaled)
    if np.abs(scaled - ints).max(initial=0.0) > 1e-6 * max(1.0, np.abs(scaled).max(initial=0.0)):
        raise ValueError("budget_dp needs integer costs: these are not integers"
                         + ("" if resolution is None else f" after scaling by resolution={resolution}")
                         + "; pass resolution=R with every cost a multiple of 1/R (e.g. costs in "
                           "bits * numel, or resolution=100 for costs with two decimals)")
    ints = ints.astype(np.int64)
    if (ints < 0).any():
        raise ValueError("budget_dp needs non-negative costs; shift each group's costs by its "
                         "minimum (and the budget by their sum)")
    g = reduce(math.gcd, [int(x) for x in ints.ravel() if x], 0) or 1
    return ints // g, budget * scale / g, g / scale


def budget_dp(costs, scores, budget: float, exact: bool = False,
              resolution: float | None = None) -> DPResult:
    """Best choice (max total score) with total cost <= budget (== budget with ``exact``).

    ``costs`` and ``scores`` are (N, K) (costs may be (K,), shared by all groups).
    """
    scores_np = torch.as_tensor(scores).detach().double().cpu().numpy()
    if scores_np.ndim != 2:
        raise ValueError(f"budget_dp scores must be (N, K), got shape {scores_np.shape}")
    costs_np = np.broadcast_to(torch.as_tensor(costs).detach().double().cpu().numpy(),
                               scores_np.shape)
    if not np.isfinite(scores_np).all():
        raise ValueError("budget_dp scores must be finite (clamp log-probabilities, e.g. "
                         "log(p.clamp_min(1e-12)))")
    ints, b_scaled, unit = _integer_costs(costs_np, float(budget), resolution)
    b = int(math.floor(b_scaled + 1e-9))
    n, k = ints.shape
    if exact and abs(b_scaled - round(b_scaled)) > 1e-9:
        raise ValueError(f"budget_dp(exact=True): budget {budget} is not reachable by sums of "
                         f"these costs (not a multiple of their common unit {unit})")
    if b < int(ints.min(1).sum()):
        raise ValueError(f"budget_dp: budget {budget} is below the cheapest choice "
                         f"{ints.min(1).sum() * unit}; no assignment fits")
    b = min(b, int(ints.max(1).sum()))  # more budget than the dearest choice buys nothing
    if n * (b + 1) > MAX_TABLE:
        raise ValueError(f"budget_dp table of {n} x {b + 1} entries is too large; use coarser "
                         f"integer costs (a smaller resolution)")
    value = np.full(b + 1, -np.inf)
    value[0] = 0.0
    back = np.zeros((n, b + 1), dtype=np.int16)
    for i in range(n):
        cand = np.full((k, b + 1), -np.inf)
        for j in range(k):
            c = ints[i, j]
            if c <= b:
                cand[j, c:] = value[:b + 1 - c] + scores_np[i, j]
        back[i] = cand.argmax(0)
        value = cand.max(0)
    if exact:
        end = b
        if not np.isfinite(value[end]):
            raise ValueError(f"budget_dp(exact=True): no choice has total cost exactly {budget}")
    else:
        end = int(np.argmax(value))  # first maximum: the cheapest of equally good choices
    choice = np.zeros(n, dtype=np.int64)
    j = end
    for i in range(n - 1, -1, -1):
        choice[i] = back[i, j]
        j -= ints[i, choice[i]]
    rows = np.arange(n)
    return DPResult(torch.from_numpy(choice), float(scores_np[rows, choice].sum()),
                    float(costs_np[rows, choice].sum()))
