"""Muon++: Muon that keeps the muP spectral condition through training ("Towards a
Principled Muon under muP: Ensuring Spectral Conditions throughout Training",
arXiv 2601.01306).

The spectral condition (Yang, Simon & Bernstein 2023, "A Spectral Condition for Feature
Learning") asks ``||W||_2 = Theta(s)`` and ``||dW||_2 = Theta(lr * s)`` with
``s = sqrt(fan_out / fan_in)``. Muon++ controls it through the updates alone, without
normalizing the weights: the orthogonalized update is scaled by ``s`` (instead of Muon's
``sqrt(max(1, A/B))``), so ``||dW||_2 <= c * lr * s`` with ``c ~ 1.21`` the largest singular
value Newton-Schulz leaves, and the decoupled decay is tied to the target ratio
``C = spectral_target`` as ``wd = 1 / C``. Then

    W_t = (1 - lr*wd) W_{t-1} - lr * s * O_t   =>   ||W_t||_2 / s <= max(||W_0||_2 / s, c * C)

for every t and any lr schedule with lr * wd <= 1: a convex combination of the initial
ratio and ``c*C`` (eq. of the bound: triangle inequality, unrolled). This is our reading of
the paper's update-level control; its data-dependent ("adaptive") condition is not
implemented. :func:`spectral_ratios` measures ``||W||_2 / s`` for plots and tests.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .factory import classify_parameters
from .muon import Muon
from .orientation import spectral_scale, stacked_names, transposed_names
from .registry import refuse_unused, register


@torch.no_grad()
def spectral_ratios(named_params, transposed: set[str] = frozenset(),
                    stacked: set[str] = frozenset()) -> dict[str, float]:
    """``||W||_2 / sqrt(fan_out/fan_in)`` of each matrix in ``(name, param)`` pairs; names in
    ``transposed`` are stored (fan_in, fan_out); for names in ``stacked`` (expert stacks
    (E, fan_out, fan_in)) the largest ratio over the experts."""
    out = {}
    for name, p in named_params:
        if p.ndim >= 2:
            if name in stacked:
                sigma = torch.linalg.matrix_norm(p.detach().float(), ord=2).max().item()
                out[name] = sigma / spectral_scale(p.shape, stacked=True)
                continue
            w = p.detach().float().reshape(p.shape[0], -1)
            out[name] = (torch.linalg.matrix_norm(w, ord=2).item()
                         / spectral_scale(p.shape, name in transposed))
    return out


def hidden_spectral_ratios(model: nn.Module) -> dict[str, float]:
    return spectral_ratios(classify_parameters(model)["hidden"], transposed_names(model),
                           stacked_names(model))


class MuonPlusPlus(Muon):
    """Muon with the muP update scale ``sqrt(fan_out/fan_in)`` and decay ``1/spectral_target``.

    ``spectral_target=None`` keeps the groups' ``weight_decay`` (the bound is then
    ``c / weight_decay``); with a target, a different non-zero hidden-group decay is replaced and
    a warning says so. ``adjust_lr`` is refused: the update scale is the muP one.
    """
    refused_options = {"adjust_lr": "Muon++ scales every update by sqrt(fan_out/fan_in) (the muP "
                                    "spectral condition), not by a shape-based lr adjustment"}

    def __init__(self, params, lr: float = 0.02, spectral_target: float | None = 2.0, **kw):
        refuse_unused(type(self), kw)
        if spectral_target is not None and spectral_target <= 0:
            raise ValueError(f"spectral_target must be > 0, got {spectral_target}")
        super().__init__(params, lr=lr, **kw)
        replaced = set()
        for g in self.param_groups:
            if g["use_muon"] and spectral_target is not None:
                if g["weight_decay"] not in (0.0, 1.0 / spectral_target):
                    replaced.add(g["weight_decay"])
                g["weight_decay"] = 1.0 / spectral_target
            g["spectral_target"] = spectral_target
        if replaced:
            warnings.warn(f"Muon++ sets hidden-matrix weight decay to 1/spectral_target = "
                          f"{1.0 / spectral_target:g} (its spectral bound needs it), replacing "
                          f"{sorted(replaced)}; other groups keep theirs. Pass spectral_target=None "
                          "to use your own decay.", UserWarning, stacklevel=2)

    def apply_update(self, group: dict, p: torch.Tensor, d: torch.Tensor) -> None:
        lr = group["lr"]
        self.decay(group, p, d)
        fan_out, fan_in = self.fans(p)
        p.add_(d, alpha=-lr * math.sqrt(fan_out / fan_in))


register("muonpp", MuonPlusPlus, lr=0.02,
         description="Muon++: Muon with the muP spectral update scale and decay 1/spectral_target")
