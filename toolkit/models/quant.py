"""Fake quantization of ``nn.Linear`` weights with a per-layer choice of bit-width.

``fake_quantize(w, bits)``: symmetric, per-output-channel uniform quantization,
q = clamp(round(w / s), -L, L) * s with L = 2^(bits-1) - 1 and s = max_j |w_ij| / L per row i
(2 bits: the ternary {-s, 0, s}); the straight-through estimator passes the gradient to ``w``
unchanged (Bengio et al. 2013), so the weights can be fine-tuned through it.

``BitChoiceLinear`` holds the options (e.g. 2, 3, 4, 8 bits) and, during a search, the weights
``p`` of the options (RCO's probabilities or a Gumbel straight-through one-hot): its weight is
sum_k p_k Q_k(W), as the reference's ``WeightInterpolation`` mixes pre-quantized weights
(IST-DASLab/RCO, ``src/search/quant.py``). ``set_choice(k)`` fixes one option.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def fake_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    if bits < 2:
        raise ValueError(f"fake_quantize needs bits >= 2 for a symmetric grid, got {bits}")
    levels = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / levels
    q = torch.clamp(torch.round(w.detach() / scale), -levels, levels) * scale
    return w + (q - w).detach()


class BitChoiceLinear(nn.Module):
    """A ``nn.Linear`` whose weight is fake-quantized to a chosen or mixed bit-width."""

    def __init__(self, linear: nn.Linear, bits: tuple[int, ...]):
        super().__init__()
        self.linear = linear
        self.bits = tuple(int(b) for b in bits)
        self.probs: torch.Tensor | None = None  # (K,) option weights; None: full precision
        self._cache: torch.Tensor | None = None

    def set_probs(self, probs: torch.Tensor | None) -> None:
        self.probs = probs

    def set_choice(self, k: int | None) -> None:
        """Fix option ``k`` (index into ``bits``); None restores full precision."""
        self.probs = None if k is None else F.one_hot(torch.tensor(k), len(self.bits)).float()

    def quantized(self) -> torch.Tensor:
        """(K, out, in) stack of Q_k(W). Cached while the weight is frozen."""
        w = self.linear.weight
        if w.requires_grad:
            return torch.stack([fake_quantize(w, b) for b in self.bits])
        if self._cache is None or self._cache.shape[1:] != w.shape:
            with torch.no_grad():
                self._cache = torch.stack([fake_quantize(w, b) for b in self.bits])
        return self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.probs is None:
            return self.linear(x)
        w = torch.einsum("k,koi->oi", self.probs.to(x.dtype), self.quantized())
        return F.linear(x, w, self.linear.bias)


def wrap_linears(model: nn.Module, bits: tuple[int, ...], skip: tuple[str, ...] = ("lm_head",)
                 ) -> list[tuple[str, BitChoiceLinear]]:
    """Replace every ``nn.Linear`` not named in ``skip`` by a ``BitChoiceLinear``, in place;
    returns (name, wrapper) in module order."""
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no nn.Linear outside {skip} to quantize")
    out = []
    for name, lin in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        wrapper = BitChoiceLinear(lin, bits)
        setattr(parent, name.rsplit(".", 1)[-1], wrapper)
        out.append((name, wrapper))
    return out


def bit_costs(layers: list[tuple[str, BitChoiceLinear]]) -> tuple[torch.Tensor, int]:
    """Integer costs (N, K): bits_k * numel_n / g, g = gcd of the numels, and g.

    With these, sum_n cost[n, k_n] <= avg_bits * sum_n numel_n / g is the average-bits budget
    weighted by parameter count, in exact integers (for ``optimizers.budget_dp``).
    """
    numels = [w.linear.weight.numel() for _, w in layers]
    g = math.gcd(*numels)
    bits = torch.tensor(layers[0][1].bits, dtype=torch.float64)
    return torch.tensor([n // g for n in numels], dtype=torch.float64)[:, None] * bits, g
