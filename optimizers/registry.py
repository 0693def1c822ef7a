"""The optimizer registry: one record per name (class, default lr, description, the options it
accepts), so a misspelt or unused option fails when the config is read, naming what is accepted.

Pure torch: nothing here imports Lightning.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

# torch's kernel/implementation switches: accepted, but not hyperparameters a user tunes
_IMPLEMENTATION_FLAGS = {"foreach", "capturable", "differentiable", "fused", "maximize"}
# set by the factory itself (build_optimizer's own arguments), never passed as options
FACTORY_ARGS = ("lr", "weight_decay", "head_names", "weight_decay_rule")


@dataclass(frozen=True)
class OptimizerRecord:
    """What ``build_optimizer(model, name, **options)`` builds.

    ``build(groups, lr=..., **options)`` makes the optimizer (the class itself unless a builder
    function was registered); ``fixed`` are defaults the registry sets over the class's own (SGD's
    momentum 0.9); ``refused`` maps options the class inherits but does not use to the reason
    (AuON has no Newton-Schulz, so ``ns_steps`` would be silently ignored).
    """
    name: str
    build: Callable[..., torch.optim.Optimizer]
    optimizer_class: type | None
    lr: float | None = None
    description: str = ""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    model_params: bool = True  # False: it optimizes other tensors (RCO's choice logits)

    def check_model_params(self) -> None:
        if not self.model_params:
            raise ValueError(f"optimizer {self.name!r} does not train model parameters "
                             f"({self.description.split(':')[0]}); pass it the tensors it "
                             f"optimizes, build_optimizer([tensor], {self.name!r}, ...), or choose "
                             f"one of {model_optimizers()} for the model")

    @property
    def refused(self) -> Mapping[str, str]:
        return getattr(self.optimizer_class, "refused_options", {})

    def signature_defaults(self) -> dict[str, Any] | None:
        """Keyword defaults of the constructor, walking up while a class forwards ``**kw`` to
        its parent; None when a builder takes ``**kw`` it never describes (anything goes)."""
        out: dict[str, Any] = {}
        if self.optimizer_class is None:
            params = list(inspect.signature(self.build).parameters.values())[1:]
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                return None
            return {p.name: p.default for p in params if p.name != "lr"}
        for klass in self.optimizer_class.__mro__:
            if "__init__" not in vars(klass):
                continue
            params = list(inspect.signature(klass.__init__).parameters.values())[2:]
            for p in params:
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in out:
                    continue
                out[p.name] = p.default
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                break
        out.pop("lr", None)
        return out

    def options(self) -> dict[str, Any] | None:
        """The hyperparameters this optimizer accepts, with the defaults it applies."""
        sig = self.signature_defaults()
        if sig is None:
            return None
        out = {k: v for k, v in sig.items() if k not in self.refused}
        out.update(self.fixed)
        return out

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise ValueError for options this optimizer would reject or silently ignore."""
        refuse_unused(self.optimizer_class, options, f"optimizer {self.name!r}",
                      " Remove it from optimizer_kwargs.")
        accepted = self.options()
        if accepted is None:
            return
        unknown = sorted(k for k in options if k not in accepted)
        if unknown:
            shown = sorted(k for k in accepted if k not in _IMPLEMENTATION_FLAGS)
            raise ValueError(f"optimizer {self.name!r} has no option(s) {unknown}; it accepts "
                             f"{shown} (lr and weight_decay are set beside optimizer_kwargs)")

    def default_lr(self) -> float:
        lr = self.lr
        if lr is None:
            param = inspect.signature(self.optimizer_class or self.build).parameters.get("lr")
            lr = param.default if param is not None else None
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise ValueError(f"optimizer {self.name!r} has no default learning rate: pass lr=..., "
                             f"or register it with optimizers.register({self.name!r}, lr=...)")
        return float(lr)

    def defaults(self) -> dict[str, Any]:
        """lr, weight_decay and every option's default, as ``toolkit optimizers`` lists them."""
        opts = {k: v for k, v in (self.options() or {}).items()
                if k not in _IMPLEMENTATION_FLAGS and k != "weight_decay"}
        return {"lr": self.default_lr(), "weight_decay": 0.0, **opts}


OPTIMIZERS: dict[str, OptimizerRecord] = {}


def refuse_unused(optimizer_class: type | None, options: Mapping[str, Any],
                  label: str | None = None, fix: str = "") -> None:
    """Raise on an option a subclass inherits but does not use (listed in its
    ``refused_options``, name -> reason), instead of ignoring it silently."""
    refused = getattr(optimizer_class, "refused_options", {})
    for key in options:
        if key in refused:
            raise ValueError(f"{label or optimizer_class.__name__} does not use {key!r}: "
                             f"{refused[key]}.{fix}")


def register(name: str, target: type | Callable | None = None, *, lr: float | None = None,
             description: str = "", model_params: bool = True, **fixed: Any):
    """Add an optimizer under ``name``: ``register("sgd", torch.optim.SGD, lr=0.01, momentum=0.9)``,
    or as a decorator on an optimizer class or a ``build(groups, lr, **options)`` function.

    ``lr`` is the optimizer's own default learning rate (one lr cannot suit every family:
    Muon's orthogonalized update wants ~20x AdamW's); None takes the constructor's ``lr``
    default, if it has one. ``fixed`` overrides constructor defaults. ``model_params=False``
    marks an optimizer of other tensors (RCO's choice logits): model builds refuse it and
    :func:`model_optimizers` leaves it out.
    """
    def add(obj):
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is registered twice")
        is_class = isinstance(obj, type)
        OPTIMIZERS[name] = OptimizerRecord(
            name=name, build=obj, optimizer_class=obj if is_class else None, lr=lr,
            description=description, fixed=dict(fixed), model_params=model_params)
        return obj

    return add if target is None else add(target)


def record(name: str) -> OptimizerRecord:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; registered: {sorted(OPTIMIZERS)}. "
                         "Add one with optimizers.register(name, OptimizerClass, lr=...).")
    return OPTIMIZERS[name]


def model_optimizers() -> list[str]:
    """Sorted names of the registered optimizers that train a model's parameters."""
    return sorted(n for n, rec in OPTIMIZERS.items() if rec.model_params)


def default_lr(name: str) -> float:
    """The learning rate ``build_optimizer(model, name)`` uses when given none."""
    return record(name).default_lr()


def optimizer_defaults(name: str) -> dict[str, Any]:
    """lr, weight_decay (the factory's, applied to hidden matrices and heads only) and the
    other options' defaults."""
    return record(name).defaults()


def check_optimizer_options(name: str, options: Mapping[str, Any], model: bool = True) -> None:
    """Fail now, naming the accepted options, on a misspelt or unused optimizer option (and, for
    a model's optimizer, on one that does not train model parameters)."""
    rec = record(name)
    if model:
        rec.check_model_params()
    rec.check_options({k: v for k, v in options.items() if k not in FACTORY_ARGS})


def describe_optimizers() -> str:
    """One block per registered optimizer: name, description, defaults."""
    blocks = []
    for name in sorted(OPTIMIZERS):
        rec = OPTIMIZERS[name]
        defaults = ", ".join(f"{k}={v}" for k, v in rec.defaults().items())
        blocks.append(f"{name}\n    {rec.description or '(no description)'}\n    defaults: {defaults}")
    return "\n".join(blocks)


# torch's classes with the cautious_wd option (optimizers.cautious); without it, torch's own step
from . import cautious as _cautious  # noqa: E402

register("adamw", _cautious.AdamW, lr=1e-3,
         description="AdamW (Loshchilov & Hutter), torch.optim.AdamW")
register("adam", _cautious.Adam, lr=1e-3, description="Adam (Kingma & Ba), torch.optim.Adam")
register("sgd", _cautious.SGD, lr=0.01, momentum=0.9,
         description="SGD with heavy-ball momentum 0.9, torch.optim.SGD; no lr suits every model "
         "(the recipes use 0.05-8)")
