"""Which way a weight matrix is stored: ``(fan_out, fan_in)`` like ``nn.Linear`` (y = x W^T),
or ``(fan_in, fan_out)`` like Hugging Face's ``Conv1D`` (``transformers.pytorch_utils``,
GPT/GPT-2: y = x W + b, "a linear layer with the weights transposed").

Every shape-dependent quantity of the matrix optimizers and the spectral monitor is defined on
the ``(fan_out, fan_in)`` matrix of the layer's linear map, not on the stored tensor:

- Muon's update scale ``sqrt(max(1, fan_out/fan_in))`` (Jordan et al. 2024) and
  ``0.2 sqrt(max(fan_out, fan_in))`` (Moonlight, Liu et al. 2025, eq. 4);
- the muP spectral scale ``sqrt(fan_out/fan_in)`` (Yang, Simon & Bernstein 2023, Condition 1),
  Muon++'s update scale and the spectral monitor's normalization;
- HyperP's muP radius ``c sqrt(fan_out)`` (the Frobenius norm of a std ``c/sqrt(fan_in)`` init).

Newton-Schulz itself commutes with transposition (``NS(W^T) = NS(W)^T``), so only these
scales depend on the orientation. The optimizer factory marks transposed weights from the
module type (``param_groups``' ``transposed`` list, one flag per parameter); detection is by
class name so this package stays importable without ``transformers``.

Expert stacks: a mixture-of-experts layer may store its E experts' matrices as one 3-D tensor
``(E, fan_out, fan_in)`` (``toolkit.models.MoEMLP``, ArchScale's ``Experts``). That is E matrices,
not one conv-like ``(E, fan_out * fan_in)`` map: every scale above (and Newton-Schulz, and
HyperP's sphere) belongs to each ``(fan_out, fan_in)`` slice. A module declares such parameters
by name in its ``expert_stacks`` attribute; the factory flags them per parameter in the groups'
``stacked`` list (:func:`stacked_names`), as it flags ``transposed`` ones. Conv kernels, which
carry no such attribute, keep the flattened ``(out, in * kernel)`` reading.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

# Modules whose ``weight`` is stored (fan_in, fan_out). Matched on the class and its bases.
TRANSPOSED_MODULES = ("Conv1D",)


def stores_transposed(module: nn.Module) -> bool:
    """Whether ``module.weight`` is stored ``(fan_in, fan_out)`` (HF ``Conv1D`` and subclasses)."""
    return any(c.__name__ in TRANSPOSED_MODULES for c in type(module).__mro__)


def fans(shape: Sequence[int], transposed: bool = False, stacked: bool = False
         ) -> tuple[int, int]:
    """``(fan_out, fan_in)`` of a weight of ``shape``: conv filters ``(out, in, *kernel)`` give
    ``(out, in * prod(kernel))``; a transposed (``Conv1D``) weight ``(in, out)`` gives
    ``(out, in)``; an expert stack ``(E, out, in)`` (``stacked``) gives each expert's ``(out, in)``."""
    if stacked:
        if len(shape) != 3 or transposed:
            raise ValueError(f"an expert stack must be a 3-D (experts, fan_out, fan_in) weight "
                             f"and not transposed, got shape {tuple(shape)}")
        return int(shape[1]), int(shape[2])
    if len(shape) < 2:
        raise ValueError(f"a weight of shape {tuple(shape)} has no fan_out/fan_in: only matrices "
                         "and conv filters do")
    if transposed:
        if len(shape) != 2:
            raise ValueError(f"only 2-D weights can be stored transposed, got shape {tuple(shape)}")
        return int(shape[1]), int(shape[0])
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def spectral_scale(shape: Sequence[int], transposed: bool = False, stacked: bool = False) -> float:
    """The muP spectral scale ``sqrt(fan_out / fan_in)`` of a (fan_out, fan_in, *kernel) weight, of
    a (fan_in, fan_out) one with ``transposed`` (HF ``Conv1D``: the scale belongs to the layer's
    map, not the storage), or of each expert of a stack; Yang, Simon & Bernstein 2023, Condition 1."""
    fan_out, fan_in = fans(shape, transposed, stacked)
    return math.sqrt(fan_out / fan_in)


def transposed_names(model: nn.Module) -> set[str]:
    """Full names of the parameters of ``model`` stored ``(fan_in, fan_out)``; a parameter
    shared with a non-transposed module (a tied weight) is not listed."""
    out, plain = set(), set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name == "weight" and p.ndim == 2 and stores_transposed(module):
                out.add((full, id(p)))
            else:
                plain.add(id(p))
    return {name for name, i in out if i not in plain}


def transposed_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter of ``model`` in :func:`transposed_names`."""
    names = transposed_names(model)
    return {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}


# per-parameter layout flags a param group may carry: key -> (ndim it implies, what it means)
_FLAGS = {"transposed": (2, "(fan_in, fan_out)"), "stacked": (3, "(experts, fan_out, fan_in)")}


def group_flags(group: dict, key: str = "transposed") -> list[bool]:
    """A param group's per-parameter ``transposed`` (or ``stacked``) flags, all False when
    absent, checked: one per parameter, and only on weights of the shape the flag implies."""
    ndim, layout = _FLAGS[key]
    params = group["params"]
    flags = list(group.get(key) or [False] * len(params))
    if len(flags) != len(params):
        raise ValueError(f"a param group has {len(params)} params but {len(flags)} {key!r} "
                         "flags: give one flag per parameter (optimizers.param_groups does)")
    for p, t in zip(params, flags):
        if t and (not isinstance(p, torch.Tensor) or p.ndim != ndim):
            raise ValueError(f"a parameter of shape {tuple(getattr(p, 'shape', ()))} is flagged "
                             f"{key}; only {ndim}-D {layout} weights can be")
    return [bool(t) for t in flags]


def stacked_names(model: nn.Module) -> set[str]:
    """Full names of the 3-D parameters of ``model`` that a module lists in ``expert_stacks``
    (one ``(fan_out, fan_in)`` matrix per expert along dim 0)."""
    out = set()
    for mod_name, module in model.named_modules():
        for p_name in getattr(module, "expert_stacks", ()):
            p = getattr(module, p_name, None)
            if isinstance(p, torch.Tensor) and p.ndim == 3:
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


def stacked_flags(group: dict) -> list[bool]:
    """A param group's per-parameter ``stacked`` flags (see :func:`group_flags`)."""
    return group_flags(group, "stacked")
