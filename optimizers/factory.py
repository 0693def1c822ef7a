"""One place that decides parameter groups and builds optimizers by name.

Param-group rules follow timm's ``param_groups_weight_decay``: no weight decay on
biases, normalization gains and embeddings. Every group also carries a ``kind``
(``hidden``, ``head``, ``embedding``, ``gain``, ``bias``) and ``use_muon`` (True only
for hidden matrices), so matrix optimizers (Muon and relatives) can split hidden
weight matrices from everything else without re-walking the model.

Pure torch: nothing here imports Lightning.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .orientation import transposed_names
from .weight_decay_rules import apply_weight_decay_rule

OptimizerBuilder = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerBuilder] = {}

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
          nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = _NORMS + (nn.RMSNorm,)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
# Output layers by conventional attribute name; Muon and muP treat them apart from
# hidden matrices (they map to a vocabulary / label space, not a hidden space).
HEAD_NAMES = ("lm_head", "head", "classifier", "output_layer", "fc_out")
KINDS = ("hidden", "head", "embedding", "gain", "bias")


def register(name: str, lr: float | None = None, description: str = "", model_params: bool = True
             ) -> Callable[[OptimizerBuilder], OptimizerBuilder]:
    """Decorator adding ``fn(groups, lr=..., **hparams) -> Optimizer`` to the registry.

    ``lr`` is the optimizer's own default learning rate (used when ``build_optimizer`` gets
    none): one lr cannot suit every family (Muon's orthogonalized update wants ~20x AdamW's).
    None takes the ``lr`` default of ``fn.optimizer_class``'s constructor, if it has one.
    ``description`` is the line ``python -m toolkit optimizers`` shows. ``model_params=False``
    marks an optimizer of other tensors (RCO's choice logits): ``build_optimizer(module, name)``
    refuses it, and :func:`model_optimizers` leaves it out.
    """

    def deco(fn: OptimizerBuilder) -> OptimizerBuilder:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is registered twice")
        fn.default_lr = lr
        fn.description = description
        fn.model_params = model_params
        OPTIMIZERS[name] = fn
        return fn

    return deco


def model_optimizers() -> list[str]:
    """Sorted names of the registered optimizers that train a model's parameters."""
    return sorted(n for n, b in OPTIMIZERS.items() if getattr(b, "model_params", True))


def default_lr(name: str) -> float:
    """The learning rate ``build_optimizer(model, name)`` uses when given none."""
    builder = OPTIMIZERS[name]
    lr = getattr(builder, "default_lr", None)
    if lr is None:
        param = _signature(builder).parameters.get("lr")
        lr = param.default if param is not None else None
    if not isinstance(lr, (int, float)):
        raise ValueError(f"optimizer {name!r} has no default learning rate: pass lr=..., or "
                         f"register it with @optimizers.register({name!r}, lr=...)")
    return float(lr)


def _signature(builder: OptimizerBuilder) -> inspect.Signature:
    return inspect.signature(getattr(builder, "optimizer_class", builder))


# torch's kernel/implementation switches: not hyperparameters a user tunes
_IMPLEMENTATION_FLAGS = {"foreach", "capturable", "differentiable", "fused", "maximize"}


def optimizer_defaults(name: str) -> dict[str, Any]:
    """lr and the other keyword defaults ``build_optimizer(model, name)`` applies
    (weight_decay is the factory's, applied to hidden matrices and heads only)."""
    builder = OPTIMIZERS[name]
    out: dict[str, Any] = {"lr": default_lr(name), "weight_decay": 0.0}
    cls = getattr(builder, "optimizer_class", None)
    # a subclass's **kw forwards to its parent's constructor, so walk up until none does
    for klass in (cls.__mro__ if cls is not None else ()):
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in params:
            if (p.default is not inspect.Parameter.empty and p.name not in out
                    and p.name not in _IMPLEMENTATION_FLAGS):
                out[p.name] = p.default
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    out.update(getattr(builder, "fixed_defaults", {}))
    return out


def describe_optimizers() -> str:
    """One block per registered optimizer: name, description, defaults."""
    blocks = []
    for name in sorted(OPTIMIZERS):
        desc = getattr(OPTIMIZERS[name], "description", "") or "(no description)"
        defaults = ", ".join(f"{k}={v}" for k, v in optimizer_defaults(name).items())
        blocks.append(f"{name}\n    {desc}\n    defaults: {defaults}")
    return "\n".join(blocks)


def _head_modules(model: nn.Module, head_names: Iterable[str] | None) -> set[str]:
    names = dict(model.named_modules())
    if head_names is not None:
        missing = [n for n in head_names if n not in names]
        if missing:
            raise ValueError(f"head_names {missing} are not modules of {type(model).__name__}; "
                             f"choose from {sorted(n for n in names if n)[:20]}...")
        return set(head_names)
    found = {n for n in names if n.split(".")[-1] in HEAD_NAMES}
    if found:
        return found
    # No conventional name: the last Linear layer registered is the output layer in
    # nearly every feed-forward model (timm and Muon's docs make the same assumption).
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    return {linears[-1]} if linears else set()


def classify_parameters(model: nn.Module, head_names: Iterable[str] | None = None
                        ) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Map each trainable parameter (shared ones once) to one of :data:`KINDS`."""
    heads = _head_modules(model, head_names)
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
            elif isinstance(module, _NORMS) or p.ndim < 2:
                kind = "bias" if p_name.endswith("bias") else "gain"
            elif mod_name in heads:
                kind = "head"
            else:
                kind = "hidden"
            out[kind].append((full, p))
    return out


def param_groups(model: nn.Module, weight_decay: float = 0.0,
                 head_names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Parameter groups with ``kind``, ``use_muon``, ``param_names``, ``transposed`` and weight
    decay.

    Weight decay applies to hidden matrices and the head only. ``transposed`` flags each
    parameter stored ``(fan_in, fan_out)`` (HF ``Conv1D``; see :mod:`optimizers.orientation`).
    """
    flipped = transposed_names(model)
    groups = []
    for kind, named in classify_parameters(model, head_names).items():
        if not named:
            continue
        groups.append({
            "params": [p for _, p in named],
            "param_names": [n for n, _ in named],
            "transposed": [n in flipped for n, _ in named],
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
    optimizer's registered default (:func:`default_lr`; ``python -m toolkit optimizers``).
    ``weight_decay_rule`` sets per-group decay (and lr) by a rule of ``weight_decay_rules.py``:
    Power Lines' ``{"kind": "power_lines", "tau": ...}`` or ``{"kind": "layerwise", ...}``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}. "
                         "Add one with @optimizers.register(name).")
    if isinstance(model, nn.Module):
        if not getattr(OPTIMIZERS[name], "model_params", True):
            raise ValueError(f"optimizer {name!r} does not train model parameters "
                             f"({OPTIMIZERS[name].description.split(':')[0]}); pass it the "
                             f"tensors it optimizes, build_optimizer([tensor], {name!r}, ...), or "
                             f"choose one of {model_optimizers()} for the model")
        groups = param_groups(model, weight_decay, head_names)
    else:
        groups = list(model)
        if groups and isinstance(groups[0], dict):
            groups = [{"weight_decay": weight_decay, **g} for g in groups]
        else:
            groups = [{"params": groups, "weight_decay": weight_decay}]
    if "betas" in hparams:  # YAML gives lists; torch wants a tuple
        hparams["betas"] = tuple(hparams["betas"])
    builder = OPTIMIZERS[name]
    if lr is None:
        lr = default_lr(name)
    if weight_decay_rule is not None:
        groups = apply_weight_decay_rule(groups, lr, weight_decay_rule)
    try:
        return builder(groups, lr=lr, **hparams)
    except TypeError as e:
        sig = inspect.signature(getattr(builder, "optimizer_class", builder))
        raise TypeError(f"optimizer {name!r} rejected its hyperparameters {sorted(hparams)}: {e}. "
                        f"It accepts {list(sig.parameters)[1:]}") from e


def _torch_builder(cls: type[torch.optim.Optimizer], **defaults: Any) -> OptimizerBuilder:
    def build(groups, lr, **hp):
        return cls(groups, lr=lr, **{**defaults, **hp})

    build.optimizer_class = cls
    build.fixed_defaults = defaults
    return build


register("adamw", lr=1e-3, description="AdamW (Loshchilov & Hutter), torch.optim.AdamW")(
    _torch_builder(torch.optim.AdamW))
register("adam", lr=1e-3, description="Adam (Kingma & Ba), torch.optim.Adam")(
    _torch_builder(torch.optim.Adam))
register("sgd", lr=0.01, description="SGD with heavy-ball momentum 0.9, torch.optim.SGD; no lr "
         "suits every model (the recipes use 0.05-8)")(_torch_builder(torch.optim.SGD, momentum=0.9))
