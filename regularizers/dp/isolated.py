"""Per-example gradients computed in isolation: the exact-by-construction path.

When :mod:`.rows` cannot show that a step keeps examples apart (mixing, batch statistics,
a loss normalized over the batch, a collate that pads to the batch's longest item, a
Python branch on a batch value, an operation without a row rule), the callback computes
that step's clipped sum here instead: each example is collated alone, the training step
runs on that batch of one, and its gradient is clipped and added. Example i's vector is
then a function of example i alone whatever the step does, so the Gaussian mechanism's
sensitivity is C by construction (Abadi et al. 2016, Alg. 1). The loss of each batch of
one is canonicalized like the fast path's (:func:`.rows.canonical_grad`) where it is
one batch reduction, so both paths clip the same per-example quantity.

An example whose gradient (or its norm) is not finite contributes zero: the choice is
public, and nothing about it leaves the mechanism.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from . import mechanism
from .pieces import wide
from .rows import RowTracker


def example_gradient(loss_of: Callable, batch, params: list) -> list[torch.Tensor]:
    """The gradient of the training step on a batch of one, fp32+, zeros where unused."""
    tracker = RowTracker(1)
    tracker.mark(batch)
    with tracker:
        loss = loss_of(batch)
    verdict = tracker.verdict(loss)
    handles = verdict.install() if verdict.separable else []
    try:
        if not loss.requires_grad:
            return [torch.zeros_like(p, dtype=wide(p).dtype) for p in params]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return [wide(g) if g is not None else torch.zeros_like(p, dtype=wide(p).dtype)
            for g, p in zip(grads, params)]


def isolated_clipped_sum(loss_of: Callable, singles: Iterable, params: list,
                         max_grad_norm: float, clipping: str = "flat"
                         ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """(sum_i c_i g_i per parameter, per-example norms, B) with every g_i computed alone."""
    sums = [torch.zeros_like(p, dtype=wide(p).dtype) for p in params]
    norms = [add_clipped_(sums, example_gradient(loss_of, batch, params), max_grad_norm, clipping)
             for batch in singles]
    return sums, (torch.stack(norms) if norms else torch.zeros(0)), len(norms)


def add_clipped_(sums: list[torch.Tensor], g: list[torch.Tensor], max_grad_norm: float,
                 clipping: str = "flat") -> torch.Tensor:
    """Adds one unit's clipped vector ``g`` (an example's gradient, or a user's mean) to
    ``sums``; returns its norm. A non-finite vector adds 0."""
    sq = [x.square().sum() for x in g]
    total = torch.sqrt(sum(sq)) if sq else torch.zeros(())
    if clipping == "flat":
        cs = [mechanism.finite_clip_factors(total, max_grad_norm)] * len(g)
    else:  # a non-finite example clips to 0 in every tensor, as in mechanism.clipped_sum
        per_layer = max_grad_norm / math.sqrt(max(len(sums), 1))
        cs = [mechanism.finite_clip_factors(torch.where(torch.isfinite(total), s.sqrt(), total),
                                            per_layer) for s in sq]
    for s, x, ci in zip(sums, g, cs):
        s.add_(torch.where(ci > 0, x * ci, torch.zeros_like(x)))
    return total
