"""RCO: Riemannian Constrained Optimization of per-group choice logits under an exact budget
(Helcig & Alistarh 2026, "Model Compression with Exact Budget Constraints via Riemannian
Manifolds", arXiv 2605.00649; reference code IST-DASLab/RCO, ``src/manifold.py``).

Each of N groups picks one of K options; option k of group n costs ``c[n, k]``. Logits
``alpha`` (N, K) give ``p = softmax(alpha, -1)`` and the expected cost (paper Sec. 2, Eq. 2)

    C(alpha) = sum_n sum_k p_nk c_nk.

``M = {alpha : C(alpha) = B}`` is a smooth (NK - 1)-manifold (Prop. 1) with the closed-form
normal (Prop. 2)

    dC/dalpha_nk = p_nk (c_nk - E_{p_n}[c_n]).

One RCO step (Sec. 3, Algorithm 1) wraps Adam:
  1. tangent projection of the gradient, g <- g - (<g, n>/<n, n>) n, so Adam's moments only see
     budget-neutral signal (as the reference's ``project_gradient``);
  2. the Adam direction d = m_hat / (sqrt(v_hat) + eps); its per-coordinate scaling leaves the
     tangent space, so d is projected again (``project_direction``) before alpha <- alpha - lr d;
  3. retraction (Prop. 3): t -> C(alpha + t c) is monotone increasing (its derivative is
     sum_n Var_{p_n}(c_n) >= 0), so a scalar t found by bisection puts alpha back on M;
  4. vector transport by projection (App. A.5): the first moment is projected onto the tangent
     space at the new point (one inner product); the second moment has no direction and stays.

The budget is therefore met by the *relaxation* at every step. The discrete choice comes from
:func:`gumbel_straight_through` during search and :func:`optimizers.rco_dp.budget_dp` at the end.
All tensors of one param group share one budget; each group carries ``costs`` (one tensor per
param, broadcastable to it, options on the last dim) and ``budget``. Pure torch.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .registry import register

Tensors = Sequence[torch.Tensor]


def expected_cost(logits: Tensors, costs: Tensors) -> torch.Tensor:
    """C(alpha) (Eq. 2) over all tensors of a group, in float64."""
    return sum(((torch.softmax(a.double(), -1) * c.double()).sum()
                for a, c in zip(logits, costs)), torch.zeros((), dtype=torch.float64))


def budget_normal(logits: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """dC/dalpha = p (c - E_p[c]) (Prop. 2), same shape and dtype as ``logits``."""
    p = torch.softmax(logits.double(), -1)
    c = costs.double().expand_as(p)
    return (p * (c - (p * c).sum(-1, keepdim=True))).to(logits.dtype)


def tangent_project(vectors: Tensors, normals: Tensors) -> list[torch.Tensor]:
    """v - (<v, n> / <n, n>) n with the inner product summed over all tensors of the group.

    A vanishing normal (every group's costs equal, or p one-hot) leaves v unchanged: there is no
    budget direction to remove there.
    """
    dot = sum((v.double() * n.double()).sum() for v, n in zip(vectors, normals))
    nn = sum((n.double() ** 2).sum() for n in normals)
    if nn <= 0:
        return [v.clone() for v in vectors]
    coef = dot / nn
    return [(v.double() - coef * n.double()).to(v.dtype) for v, n in zip(vectors, normals)]


def cost_range(shapes: Sequence[torch.Size], costs: Tensors) -> tuple[float, float]:
    """The smallest and largest total cost of a discrete choice (the limits of C(alpha))."""
    lo = sum(float(c.double().expand(s).amin(-1).sum()) for s, c in zip(shapes, costs))
    hi = sum(float(c.double().expand(s).amax(-1).sum()) for s, c in zip(shapes, costs))
    return lo, hi


def check_budget(shapes: Sequence[torch.Size], costs: Tensors, budget: float) -> None:
    lo, hi = cost_range(shapes, costs)
    if not lo < budget < hi:
        raise ValueError(
            f"RCO budget {budget} is infeasible for the relaxation: the expected cost C(alpha) "
            f"only reaches the open interval ({lo}, {hi}) (sum of per-group minimum / maximum "
            f"costs); choose a budget strictly inside it")


@torch.no_grad()
def retract_(logits: Tensors, costs: Tensors, budget: float, rtol: float = 1e-10,
             max_iter: int = 200) -> float:
    """Shift ``alpha <- alpha + t c`` in place so that C(alpha) = budget (Prop. 3); returns t.

    C(alpha + t c) is monotone in t, so the bracket is doubled outward until it holds the root
    and then bisected in float64 until |C - B| <= rtol * max(1, |B|) or the bracket collapses.
    """
    check_budget([a.shape for a in logits], costs, budget)
    base = [a.double() for a in logits]
    cs = [c.double() for c in costs]

    def cost_at(t: float) -> float:
        return float(expected_cost([a + t * c for a, c in zip(base, cs)], cs))

    tol = rtol * max(1.0, abs(budget))
    if abs(cost_at(0.0) - budget) <= tol:
        return 0.0
    lo, hi = -1.0, 1.0
    while cost_at(lo) > budget:
        lo *= 2.0
    while cost_at(hi) < budget:
        hi *= 2.0
    t = 0.5 * (lo + hi)
    for _ in range(max_iter):
        t = 0.5 * (lo + hi)
        e = cost_at(t) - budget
        if abs(e) <= tol or hi - lo <= 1e-15 * max(1.0, abs(t)):
            break
        lo, hi = (lo, t) if e > 0 else (t, hi)
    for a, b, c in zip(logits, base, cs):
        a.copy_(b + t * c)
    return t


def gumbel_straight_through(logits: torch.Tensor, tau: float = 1.0,
                            generator: torch.Generator | None = None,
                            costs: torch.Tensor | None = None, budget: float | None = None,
                            resolution: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gumbel straight-through sample (Jang et al. 2017) of one option per row of (N, K) logits.

    Returns ``(onehot, index)``: the forward value of ``onehot`` is the hard choice, its gradient
    that of ``softmax((logits + g) / tau)``. Without ``costs`` the choice is the argmax of the
    perturbed logits; with ``costs`` and ``budget`` it is the best choice under total cost
    <= budget (paper Sec. 3: the perturbed logits as scores of :func:`budget_dp`).
    """
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64,
                   device=logits.device).clamp(1e-20, 1 - 1e-16)
    noisy = (logits + (-torch.log(-torch.log(u))).to(logits.dtype)) / tau
    soft = torch.softmax(noisy, -1)
    if costs is None:
        index = noisy.detach().argmax(-1)
    else:
        if budget is None:
            raise ValueError("gumbel_straight_through: costs given without budget")
        from .rco_dp import budget_dp
        index = budget_dp(costs, noisy.detach(), budget, resolution=resolution).choice
        index = index.to(logits.device)
    hard = F.one_hot(index, logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft, index


class RCO(torch.optim.Optimizer):
    """Adam on the budget manifold (module docstring). The logits are retracted onto the
    manifold when the optimizer is built, so the budget holds from step 0."""

    def __init__(self, params, costs=None, budget: float | None = None, lr: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, project_direction: bool = True, rtol: float = 1e-10):
        if lr <= 0:
            raise ValueError(f"RCO lr must be positive, got {lr}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        costs=costs, budget=budget, project_direction=project_direction,
                        rtol=rtol)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._check_group(i, group)
            self.retract_group(group)

    @staticmethod
    def _check_group(i: int, group: dict) -> None:
        if group["weight_decay"]:
            raise ValueError(f"RCO param group {i}: weight_decay={group['weight_decay']} would pull "
                             "the logits towards uniform against the objective; pass weight_decay=0")
        params, costs = group["params"], group["costs"]
        if costs is None or group["budget"] is None:
            raise ValueError(f"RCO param group {i} needs costs (one tensor per logits tensor, "
                             "options on the last dim) and budget: build_optimizer([logits], "
                             "'rco', costs=c, budget=B) or put them in the group dict")
        if isinstance(costs, torch.Tensor):
            costs = [costs]
        if len(costs) != len(params):
            raise ValueError(f"RCO param group {i}: {len(params)} logits tensors but "
                             f"{len(costs)} cost tensors; give one cost tensor per logits tensor")
        costs = [torch.as_tensor(c, dtype=torch.float64, device=p.device)
                 for c, p in zip(costs, params)]
        for p, c in zip(params, costs):
            if p.ndim < 1 or p.shape[-1] < 2:
                raise ValueError(f"RCO logits must have >= 2 options on the last dim, got shape "
                                 f"{tuple(p.shape)}")
            try:
                c.expand(p.shape)
            except RuntimeError:
                raise ValueError(f"RCO costs of shape {tuple(c.shape)} do not broadcast to the "
                                 f"logits' shape {tuple(p.shape)}") from None
        group["costs"] = costs
        group["budget"] = float(group["budget"])
        check_budget([p.shape for p in params], costs, group["budget"])

    def retract_group(self, group: dict) -> float:
        return retract_(group["params"], group["costs"], group["budget"], group["rtol"])

    @torch.no_grad()
    def expected_cost(self, group_index: int = 0) -> float:
        g = self.param_groups[group_index]
        return float(expected_cost(g["params"], g["costs"]))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            costs = [c for p, c in zip(group["params"], group["costs"]) if p.grad is not None]
            beta1, beta2 = group["betas"]
            normals = [budget_normal(p, c) for p, c in zip(params, costs)]
            grads = tangent_project([p.grad for p in params], normals)
            dirs = []
            for p, g in zip(params, grads):
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = st["exp_avg"] / (1 - beta1 ** st["step"])
                v_hat = st["exp_avg_sq"] / (1 - beta2 ** st["step"])
                dirs.append(m_hat / (v_hat.sqrt() + group["eps"]))
            if group["project_direction"]:
                dirs = tangent_project(dirs, normals)
            for p, d in zip(params, dirs):
                p.sub_(d, alpha=group["lr"])
            self.retract_group(group)
            new_normals = [budget_normal(p, c) for p, c in zip(params, costs)]
            moments = tangent_project([self.state[p]["exp_avg"] for p in params], new_normals)
            for p, m in zip(params, moments):
                self.state[p]["exp_avg"].copy_(m)
        return loss


register("rco", RCO, lr=0.05, model_params=False,
         description="RCO (Helcig & Alistarh 2026): Adam on choice logits under an exact expected-cost "
                     "budget (tangent projection, retraction, momentum transport); needs costs= and "
                     "budget=, not model param groups")
