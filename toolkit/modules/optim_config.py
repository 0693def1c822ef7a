"""OptimizerConfig: the one optimizer-and-schedule configuration every toolkit module takes.

A recipe sets it under the module's own keys (``model.init_args.optimizer``, ``lr``,
``weight_decay``, ``optimizer_kwargs``, ``warmup_steps``, ``lr_decay``, ``min_lr_ratio``):
the modules forward them, unnamed, to :class:`toolkit.modules.TrainModule`, the only
signature that lists them, so they cannot drift apart between module classes again (the
Hugging Face modules once defaulted to lr 1e-3 for every optimizer, Muon included).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

import optimizers

FIELDS = ("optimizer", "lr", "weight_decay", "optimizer_kwargs", "warmup_steps", "lr_decay",
          "min_lr_ratio")


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer a module builds (``optimizers.build_optimizer``) and its warmup+decay
    schedule (``optimizers.warmup_decay``).

    ``lr=None`` is the optimizer's registered default (``toolkit optimizers``: AdamW 1e-3,
    Muon 0.02, ...), resolved by :meth:`resolve`. A module class's own defaults for the other
    fields are a ``OptimizerConfig`` too (``TrainModule.optim_defaults``): the language models
    decay weights by 0.1 and to 0.1 of the peak lr, the classifiers by 0 and to 0.
    """

    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_steps: int = 0
    lr_decay: str = "cosine"
    min_lr_ratio: float = 0.0

    def resolve(self, **given: Any) -> "OptimizerConfig":
        """This config with the arguments ``given`` (None: keep this config's value) and the lr
        filled in from the registry; bad optimizer options fail here, naming the accepted ones."""
        unknown = set(given) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown optimizer setting(s) {sorted(unknown)}; the settings are "
                            f"{list(FIELDS)}")
        cfg = dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})
        cfg = dataclasses.replace(cfg, optimizer_kwargs=dict(cfg.optimizer_kwargs or {}))
        optimizers.check_optimizer_options(cfg.optimizer, cfg.optimizer_kwargs)
        if cfg.lr is None:
            cfg = dataclasses.replace(cfg, lr=optimizers.default_lr(cfg.optimizer))
        return cfg

    def hparams(self) -> dict[str, Any]:
        """The settings as hyperparameters (what a checkpoint and TensorBoard record)."""
        return {k: getattr(self, k) for k in FIELDS}

    def build(self, module: torch.nn.Module, total_steps: float) -> dict[str, Any]:
        """``configure_optimizers``' return value: the optimizer over ``module``'s parameters and
        a per-step schedule over ``total_steps`` (``inf`` when the trainer has no budget)."""
        from lightning.pytorch.utilities import rank_zero_info

        kwargs = dict(self.optimizer_kwargs)
        rule = kwargs.get("weight_decay_rule")
        if (rule and rule.get("kind") == "power_lines" and math.isfinite(total_steps)
                and not {"steps", "batch_size", "dataset_size"} & set(rule)):
            kwargs["weight_decay_rule"] = {**rule, "steps": total_steps}  # B / D: 1 / steps
        opt = optimizers.build_optimizer(module, self.optimizer, lr=self.lr,
                                         weight_decay=self.weight_decay, **kwargs)
        if rule:  # the decay a rule chose is otherwise visible nowhere
            rank_zero_info(describe_rule(kwargs["weight_decay_rule"], opt))
        if not math.isfinite(total_steps):
            if self.lr_decay != "constant":
                raise ValueError("an lr decay needs a known step budget: set trainer.max_steps "
                                 "(or lr_decay: constant)")
            total_steps = 1
        sched = optimizers.warmup_decay(opt, int(total_steps), self.warmup_steps, self.lr_decay,
                                        self.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def describe_rule(rule: dict[str, Any], opt: torch.optim.Optimizer) -> str:
    """One line naming the lr and weight decay a ``weight_decay_rule`` gave each group kind."""
    got = {g.get("kind", "all"): (g.get("lr", math.nan), g.get("weight_decay", 0.0))
           for g in opt.param_groups}
    groups = ", ".join(f"{k}: lr {lr:.4g} weight_decay {wd:.4g}" for k, (lr, wd) in got.items())
    return f"weight_decay_rule {rule} -> {groups}"


CLASSIFIER_DEFAULTS = OptimizerConfig()
LM_DEFAULTS = OptimizerConfig(weight_decay=0.1, min_lr_ratio=0.1)
