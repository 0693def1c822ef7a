"""AuON and Hybrid-AuON (Maity 2025, "AuON: A Linear-time Alternative to Semi-Orthogonal
Momentum Updates", arXiv 2509.24320).

We implement the paper's normalized form, not the authors' packaged code (which differs
from it). For the Nesterov momentum ``M`` of a hidden matrix with ``N`` entries:

    G = M / (||M||_F + 1e-7)
    U = G / (sqrt(mean(cosh(G)^2)) + 1e-8)
    W <- (1 - lr*wd) W - lr * sqrt(max(1, A/B)) * U

``||U||_2 <= ||U||_F <= 1``: the step stays in a spectral-norm trust region with no
orthogonalization, in O(N) time and memory. Hybrid-AuON first applies a single
Newton-Schulz iteration to ``M`` (the reference quintic, one step), then the same scaling.
Non-matrix groups get Muon's internal AdamW. Because ``||U||_F <= 1`` rather than Muon's
``||U||_F ~ sqrt(min(A, B))``, AuON's per-entry step is smaller and its tuned lr larger.

What to expect: after the Frobenius normalization ``|G_ij| <= 1`` and ``sum G_ij^2 = 1``, so
``mean(cosh(G)^2) = 1 + mean(sinh(G)^2) <= 1 + sinh(1)^2 / N``: the cosh division changes the
update by less than ``0.7 / N`` relative (3e-5 for a 128x128 matrix), whatever the tails.
``U`` is therefore the normalized momentum itself, with the momentum's singular spectrum:
AuON is per-matrix normalized SGD-momentum, and no lr or weight decay gives it Muon's
equalized directions (see ``recipes/auon_lm.yaml`` for how far it lands from Muon on the
char GPT).
"""
from __future__ import annotations

import torch

from .muon import Muon
from .registry import refuse_unused, register


def auon_normalize(m: torch.Tensor, stacked: bool = False) -> torch.Tensor:
    """Frobenius normalization, then division by the RMS of cosh of the entries (fp32); with
    ``stacked`` each expert matrix ``m[e]`` of an (E, fan_out, fan_in) stack on its own."""
    g = m.float()
    dims = (-2, -1) if stacked else None
    g = g / (torch.linalg.vector_norm(g, dim=dims, keepdim=stacked) + 1e-7)
    return g / (torch.cosh(g).square().mean(dim=dims, keepdim=stacked).sqrt() + 1e-8)


class AuON(Muon):
    """Linear-time AuON: no Newton-Schulz, so ``ns_steps`` (and the Newton-Schulz precision
    switches) are refused rather than ignored."""
    refused_options = {"ns_steps": "AuON normalizes the momentum in linear time, without "
                                    "Newton-Schulz (use hybrid_auon for one iteration)",
                       "ns_dtype": "AuON runs no Newton-Schulz", "ns_matmul": "AuON runs no Newton-Schulz",
                       "ns_coefficients": "AuON runs no Newton-Schulz"}

    def __init__(self, params, lr: float = 0.02, **kw):
        refuse_unused(type(self), kw)
        super().__init__(params, lr=lr, **kw)

    def directions(self, entries):
        return [auon_normalize(u, self.is_stacked(p)) for _, p, u in entries]

    def direction_dtype(self, group):
        return torch.float32


class HybridAuON(Muon):
    """AuON after one Newton-Schulz iteration (``ns_steps`` defaults to 1)."""

    def __init__(self, params, lr: float = 0.02, ns_steps: int = 1, **kw):
        super().__init__(params, lr=lr, ns_steps=ns_steps, **kw)

    def directions(self, entries):
        ortho = super().directions(entries)
        return [auon_normalize(o, self.is_stacked(p)) for (_, p, _), o in zip(entries, ortho)]

    def direction_dtype(self, group):
        return torch.float32


register("auon", AuON, lr=0.1,
         description="AuON (Maity 2025): linear-time normalized momentum, no Newton-Schulz; its unit-Frobenius "
                     "update wants an lr ~5x Muon's")
register("hybrid_auon", HybridAuON, lr=0.1,
         description="Hybrid-AuON: one Newton-Schulz step, then AuON normalization; lr as AuON")
