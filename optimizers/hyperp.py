"""HyperSphere: Muon on a Frobenius sphere (HyperP; Ren et al., "Rethinking Language Model
Scaling under Transferable Hypersphere Optimization").

Each hidden matrix keeps the Frobenius norm it had at its first step, ``r = ||W_0||_F``
(the paper's code), or, with ``radius_scale=c``, the muP radius ``r = c * sqrt(fan_out)`` (fan_out of the layer's map:
the second dim of a transposed HF ``Conv1D`` weight):
the Frobenius norm of a Gaussian matrix with std ``c / sqrt(fan_in)`` (the muP hidden
init). With ``U`` the Muon update (Newton-Schulz of the Nesterov momentum), one step is

    W' = W - lr * (||W||_F / ||U||_F) * U,      W <- r * W' / ||W'||_F

so the *relative* step ``||W' - W||_F / ||W||_F`` is exactly ``lr`` whatever the width:
the base lr transfers across widths *if* the radius does. Since Muon's ``U`` has (nearly)
equal singular values, the step's spectral norm is ``lr * r / sqrt(min(fan_out, fan_in))``.
With the std-0.02 init norm that grows like ``sqrt(width)`` (and so does ``||W||_2``),
which breaks the muP spectral condition ``||dW||_2 ~ sqrt(fan_out/fan_in)`` (Yang, Simon &
Bernstein 2023) and moves the best lr down with width; with the muP radius both are
width-independent at a fixed aspect ratio. Decoupled weight decay only rescales ``W``, and the
retraction undoes any rescaling, so it is an exact no-op here (the paper's first-order
statement, exact for this update); it is still applied, so the claim is tested, not assumed.
Depth: with depth-muP residual branches (``GPTConfig.depth_mup``, 1/sqrt(2L)), the hidden
lr is ``lr * sqrt(base_depth / depth)`` when ``base_depth`` is given (``depth`` defaults to
the number of distinct ``blocks.<i>.`` in the group's ``param_names``); it is opt-in
(``recipes/hyperp_lm.yaml`` records how it fared against the residual scaling alone).
Non-matrix groups get Muon's internal AdamW. Expert stacks (E, fan_out, fan_in) (the factory's
``stacked`` flag, MoE layers) keep one sphere per expert: each slice has its own radius, relative
step and retraction, as E separate matrices would.
"""
from __future__ import annotations

import math
import re

import torch

from . import sharded
from .registry import refuse_unused, register
from .muon import Muon


def infer_depth(param_names: list[str]) -> int | None:
    idx = {m.group(1) for n in param_names for m in [re.search(r"blocks\.(\d+)\.", n)] if m}
    return len(idx) or None


class HyperSphere(Muon):
    """Muon with a fixed-norm (hypersphere) constraint on hidden matrices.

    Args beyond :class:`Muon`'s: ``base_depth`` (depth the lr was tuned at; enables the
    depth-muP rule ``lr * sqrt(base_depth/depth)``) and ``depth`` (target depth; inferred
    from ``param_names`` when omitted), ``radius_scale`` (``None``: keep each matrix's
    initial norm; ``c``: put it on the muP sphere of radius ``c * sqrt(fan_out)`` at its
    first step; ``c = 1`` is the muP init's norm, the radius ``recipes/hyperp_lm.yaml`` uses).
    ``adjust_lr`` is refused: the step is relative.
    """

    refused_options = {"adjust_lr": "HyperSphere's step is relative to ||W||_F (lr is the relative "
                                     "step), so no shape-based lr adjustment applies"}

    def __init__(self, params, lr: float = 0.02, base_depth: int | None = None,
                 depth: int | None = None, radius_scale: float | None = None, **kw):
        refuse_unused(type(self), kw)
        if radius_scale is not None and not radius_scale > 0:
            raise ValueError(f"radius_scale must be > 0 (or None to keep the initial norms), "
                             f"got {radius_scale}")
        super().__init__(params, lr=lr, **kw)
        self.defaults["radius_scale"] = radius_scale
        for g in self.param_groups:
            g.setdefault("radius_scale", radius_scale)
            g["lr_depth_factor"] = 1.0
            if g["use_muon"] and base_depth is not None:
                d = depth or infer_depth(g.get("param_names", []))
                if d is None:
                    raise ValueError("HyperSphere(base_depth=...) needs the model depth: pass "
                                     "depth=n_layer or groups with param_names like 'blocks.3.*'")
                g["lr_depth_factor"] = math.sqrt(base_depth / d)
        if self._sharded:  # the radius needs radius_scale, set above
            sharded.init_state(self)

    def initial_state(self, group: dict, p: torch.Tensor) -> dict:
        st = super().initial_state(group, p)
        if group["use_muon"] and "radius_scale" in group:
            st["radius"] = self._radius(group, p)
        return st

    def _radius(self, group: dict, p: torch.Tensor) -> torch.Tensor:
        c = group.get("radius_scale")  # absent in checkpoints from before the option
        if c is not None:  # fan_out, whichever way the weight is stored (HF Conv1D)
            return torch.tensor(c * math.sqrt(self.fans(p)[0]), dtype=p.dtype, device=p.device)
        r = self._norm(p, p)
        return r.full_tensor() if sharded.is_dtensor(r) else r  # a plain scalar on every rank

    def _norm(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Frobenius norm of ``t`` (shaped like ``p``): per expert, (E, 1, 1), for a stack."""
        if self.is_stacked(p):
            return torch.linalg.vector_norm(t, dim=(-2, -1), keepdim=True)
        return torch.linalg.vector_norm(t)

    def apply_update(self, group: dict, p: torch.Tensor, d: torch.Tensor) -> None:
        st = self.state[p]
        if "radius" not in st:
            st["radius"] = self._radius(group, p)
        lr = group["lr"] * group["lr_depth_factor"]
        self.decay(group, p, d)
        u = d.float()
        step = lr * self._norm(p, p) / self._norm(p, u).clamp_min(1e-12)
        p.sub_(u * step)
        p.mul_(st["radius"] / self._norm(p, p).clamp_min(1e-12))


register("hyperp", HyperSphere, lr=0.02,
         description="HyperP (Ren et al.): Muon on a Frobenius sphere; radius_scale=1.0 for lr "
                     "transfer across width")
