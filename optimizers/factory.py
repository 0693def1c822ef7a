"""One place that decides parameter groups and builds optimizers by name.

Param-group rules follow timm's ``param_groups_weight_decay``: no weight decay on
biases, normalization gains and embeddings. Every group also carries a ``kind``
(``hidden``, ``head``, ``embedding``, ``gain``, ``bias``) and ``use_muon`` (True only
for hidden matrices), so matrix optimizers (Muon and relatives) can split hidden
weight matrices from everything else without re-walking the model.

Pure torch: nothing here imports Lightning.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .heads import HEAD_NAMES, head_modules  # noqa: F401  (HEAD_NAMES: old import path)
from .muon import Muon, default_adam_lr
from .orientation import stacked_names, transposed_names
from .parametrization import collect_tags, lr_groups
from .registry import record
from .weight_decay_rules import apply_weight_decay_rule

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
          nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
KINDS = ("hidden", "head", "embedding", "gain", "bias")
_head_modules = head_modules  # old name


def classify_parameters(model: nn.Module, head_names: Iterable[str] | None = None
                        ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Map each trainable parameter (shared ones once) to one of :data:`KINDS`."""
    heads = head_modules(model, head_names)
    out: dict[str, list[tuple[str, nn.Parameter]]] = {k: [] for k in KINDS}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, _EMBEDDINGS):
                kind = "embedding"
            elif (isinstance(module, _NORMS) or p.ndim < 2
                  or p_name in getattr(module, "expert_biases", ())):
                biases = getattr(module, "expert_biases", ())
                kind = "bias" if p_name.endswith("bias") or p_name in biases else "gain"
            elif mod_name in heads:
                kind = "head"
            else:
                kind = "hidden"
            out[kind].append((full, p))
    return out


def param_groups(model: nn.Module, weight_decay: float = 0.0,
                 head_names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Parameter groups with ``kind``, ``use_muon``, ``param_names``, ``transposed``, ``stacked``
    and weight decay.

    Weight decay applies to hidden matrices and the head only. ``transposed`` flags each
    parameter stored ``(fan_in, fan_out)`` (HF ``Conv1D``), ``stacked`` each 3-D stack of expert
    matrices (``MoEMLP``); see :mod:`optimizers.orientation`.
    """
    flipped, stacks = transposed_names(model), stacked_names(model)
    groups = []
    for kind, named in classify_parameters(model, head_names).items():
        if not named:
            continue
        groups.append({
            "params": [p for _, p in named],
            "param_names": [n for n, _ in named],
            "transposed": [n in flipped for n, _ in named],
            "stacked": [n in stacks for n, _ in named],
            "kind": kind,
            "use_muon": kind == "hidden",
            "weight_decay": weight_decay if kind in ("hidden", "head") else 0.0,
        })
    return groups


def build_optimizer(model: nn.Module | Iterable, name: str = "adamw", lr: float | None = None,
                    weight_decay: float = 0.0, head_names: Iterable[str] | None = None,
                    weight_decay_rule: dict[str, Any] | None = None,
                    **hparams: Any) -> torch.optim.Optimizer:
    """Build registered optimizer ``name`` over ``model``'s parameter groups.

    ``model`` may be an ``nn.Module`` (groups from :func:`param_groups`) or an iterable
    of ready-made param groups (dicts) / parameters. Extra ``hparams`` go to the
    optimizer's constructor (``betas``, ``momentum``, ``ns_steps`` ...). ``lr=None`` uses the
    optimizer's registered default (``python -m toolkit optimizers``); an option the optimizer does not accept fails here,
    naming the ones it does.
    ``weight_decay_rule`` sets per-group decay (and lr) by a rule of ``weight_decay_rules.py``:
    Power Lines' ``{"kind": "power_lines", "tau": ...}`` or ``{"kind": "layerwise", ...}``.
    """
    rec = record(name)
    rec.check_options(hparams)
    if isinstance(model, nn.Module):
        rec.check_model_params()
        groups = param_groups(model, weight_decay, head_names)
    else:
        groups = list(model)
        if groups and isinstance(groups[0], dict):
            groups = [{"weight_decay": weight_decay, **g} for g in groups]
        else:
            groups = [{"params": groups, "weight_decay": weight_decay}]
    if "betas" in hparams:  # YAML gives lists; torch wants a tuple
        hparams["betas"] = tuple(hparams["betas"])
    if lr is None:
        lr = rec.default_lr()
    tags = collect_tags(model) if isinstance(model, nn.Module) else {}
    if tags:  # a muP / u-muP model: per-tensor lrs (optimizers/parametrization.py)
        if weight_decay_rule is not None and weight_decay_rule.get("kind") == "layerwise":
            raise ValueError("the layerwise weight_decay_rule rescales hidden lrs, which the "
                             "model's parametrization (mup/umup) already sets: drop the rule or "
                             "use parametrization: sp")
        muon = isinstance(rec.optimizer_class, type) and issubclass(rec.optimizer_class, Muon)
        opts = {**rec.defaults(), **rec.fixed, **hparams} if muon else {}
        adam_lr = default_adam_lr(lr, opts.get("adam_lr"), opts.get("adjust_lr", "original"))
        groups = lr_groups(groups, tags, lr, muon, adam_lr)
    if weight_decay_rule is not None:
        groups = apply_weight_decay_rule(groups, lr, weight_decay_rule)
    return rec.build(groups, lr=lr, **{**rec.fixed, **hparams})
