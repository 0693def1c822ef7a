"""Per-tensor learning rates of muP and u-muP, from the models' parameter tags (pure torch).

A model built under a parametrization (``toolkit.models.parametrization``) carries on each
module a ``param_tags`` dict ``{parameter name: tag}``, the tag giving ``parametrization``,
``role`` (input / hidden / output / norm / bias), ``fan_in``, ``fan_out``, ``depth`` (number
of residual blocks, for tensors inside one) and ``width_mult``. :func:`lr_groups` splits the
factory's param groups so each tensor gets ``lr * multiplier(tag)``:

u-muP with Adam(W) (Blake et al., ICLR 2025, arXiv 2407.17465, Table 3: the Adam LR row
``C_W``, and Sec. 4.4 for depth)::

    input (embeddings)  1 / sqrt(fan_out)      hidden  1 / sqrt(fan_in)
    output (readout)    1                      norm, bias  1
    times 1 / sqrt(depth) for every tensor inside the residual blocks

Weight decay keeps the toolkit's coupled form (a step shrinks weights by ``lr * weight_decay``
with each tensor's own lr); the reference optimizer's default instead divides the decay by the
tensor's lr (``independent_weight_decay``), which would change what ``weight_decay`` means.

muP with Adam (Yang et al. 2022, Tensor Programs V, Table 8): hidden ``1 / width_mult``,
everything else 1.

The Muon family (groups with ``use_muon``): Muon's orthogonalized step already has the spectral
norm muP asks of a hidden matrix (Bernstein et al.; the step is shape-scaled by Muon's own
``adjust_lr``), so under muP its hidden multiplier is 1. Under u-muP the forward multiplies the
stored weight by ``1/sqrt(fan_in)`` (A_W), which shrinks the step's effect on the layer's map
by the same factor; the multiplier ``sqrt(fan_in)`` (with the same ``1/sqrt(depth)``) restores
it, so the layer sees exactly the update Muon would make under sp and Muon's lr means the same
under both. Muon's AdamW groups (embeddings, head, gains) get the Adam rules above, applied to
``adam_lr``.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn

PARAMETRIZATIONS = ("mup", "umup")
_LISTS = ("params", "param_names", "transposed", "stacked")  # per-parameter group entries


def collect_tags(model: nn.Module) -> dict[str, Any]:
    """``{full parameter name: tag}`` from every module's ``param_tags``."""
    out = {}
    for mod_name, module in model.named_modules():
        for p_name, tag in (getattr(module, "param_tags", None) or {}).items():
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = tag
    return out


def adam_multiplier(tag) -> float:
    """The Adam lr multiplier of one tagged tensor (module docstring's tables)."""
    if tag.parametrization == "mup":
        return 1 / tag.width_mult if tag.role == "hidden" else 1.0
    if tag.parametrization != "umup":
        raise ValueError(f"unknown parametrization {tag.parametrization!r} in a parameter tag; "
                         f"the factory knows {PARAMETRIZATIONS}")
    base = {"input": tag.fan_out ** -0.5, "hidden": tag.fan_in ** -0.5}.get(tag.role, 1.0)
    return base * (tag.depth ** -0.5 if tag.depth else 1.0)


def muon_multiplier(tag) -> float:
    """The multiplier of a hidden matrix updated by Muon (module docstring)."""
    if tag.parametrization == "mup":
        return 1.0
    return tag.fan_in ** 0.5 * (tag.depth ** -0.5 if tag.depth else 1.0)


def lr_groups(groups: Iterable[dict[str, Any]], tags: dict[str, Any], lr: float,
              muon: bool = False, adam_lr: float | None = None) -> list[dict[str, Any]]:
    """Split the factory's groups (with ``param_names``) into one group per (group, multiplier),
    each with its own ``lr``. With ``muon`` (a Muon-family optimizer), ``use_muon`` groups scale
    ``lr`` by :func:`muon_multiplier` and the others scale ``adam_lr`` (Muon's AdamW lr) by
    :func:`adam_multiplier`; otherwise every group scales ``lr`` by :func:`adam_multiplier`.
    Untagged parameters in a tagged model are an error."""
    out = []
    for g in groups:
        g = {k: list(v) if k in _LISTS and k in g else v for k, v in g.items()}
        by_muon = muon and g.get("use_muon", False)
        split: dict[float, dict[str, Any]] = {}
        for i, name in enumerate(g["param_names"]):
            if name not in tags:
                raise ValueError(f"parameter {name!r} has no parametrization tag; every "
                                 "parameter of a muP/u-muP model needs one (its module's "
                                 "param_tags)")
            tag = tags[name]
            group_lr = (lr if by_muon or not muon else adam_lr) * (
                muon_multiplier(tag) if by_muon else adam_multiplier(tag))
            new = split.setdefault(group_lr, {**g, "lr": group_lr,
                                              **{k: [] for k in _LISTS if k in g}})
            for k in _LISTS:
                if k in g:
                    new[k].append(g[k][i])
        out.extend(split.values())
    return out


def describe(groups: list[dict[str, Any]]) -> str:
    """One line per group: kind, lr and its tensors (for logs and the docs)."""
    return "\n".join(f"{g.get('kind', '?')}: lr {g['lr']:.4g} wd {g.get('weight_decay', 0):.3g} "
                     f"{', '.join(g['param_names'])}" for g in groups)

