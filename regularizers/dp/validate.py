"""What would silently void a DP-SGD guarantee, refused with the fix named.

Structural checks run at set-up; :func:`check_step` and :func:`check_optimizers` run again
at every step, since a callback can change the trainer (``GradientAccumulationScheduler``)
or the trainable set (``BackboneFinetuning``) mid-run.
"""
from __future__ import annotations

import math
from numbers import Real

from torch import nn

from .errors import PrivacyError
from .samplers import refusal

MIXING_CALLBACKS = ("KMixup", "Mixup", "MixUp", "CutMix", "Cutmix", "BatchMixup")


def check_number(name: str, value, low: float = 0.0, high: float = math.inf,
                 low_open: bool = True, high_open: bool = False) -> float:
    """A finite real in the interval, else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    lo_bad = value <= low if low_open else value < low
    hi_bad = value >= high if high_open else value > high
    if lo_bad or hi_bad:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={value!r} must lie in {lo}{low:g}, {high:g}{hi}")
    return float(value)


def check_model(model: nn.Module) -> None:
    """Refuse modules whose trainable parameters no per-example rule covers (the
    data-dependent checks are :mod:`.probe`'s)."""
    problems = [f"{name or type(m).__name__}: {why}" for name, m in model.named_modules()
                if any(p.requires_grad for p in m.parameters(recurse=False))
                and (why := refusal(m))]
    if problems:
        raise PrivacyError("DP-SGD cannot train this model privately:\n  - " + "\n  - ".join(problems))


def check_callbacks(callbacks) -> None:
    """Batch-mixing regularizers (mixup, k-mixup ...) make one example's gradient depend on
    others, so clipping no longer bounds one example's influence."""
    bad = [type(cb).__name__ for cb in callbacks
           if getattr(cb, "mixes_batch", False) or type(cb).__name__ in MIXING_CALLBACKS]
    if bad:
        raise PrivacyError(f"callbacks {bad} mix examples across the batch, so clipping no longer "
                           "bounds one example's influence: remove them from a DP-SGD run")
    reads = [type(cb).__name__ for cb in callbacks if getattr(cb, "reads_batch_into_update", False)]
    if reads:
        raise PrivacyError(f"callbacks {reads} change the update from the training batch itself "
                           "(e.g. a step size measured on it), a release no DP-SGD noise covers: "
                           "remove them from a DP-SGD run")


def check_step(trainer) -> None:
    """The trainer settings that change what one step releases; checked before each step."""
    if trainer.accumulate_grad_batches != 1:
        raise PrivacyError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} (set directly or by a "
            "GradientAccumulationScheduler): only the last micro-batch would be privatized and "
            "the accountant analyses one Poisson batch per step; set accumulate_grad_batches 1 "
            "and raise data.batch_size instead")
    if trainer.gradient_clip_val not in (None, 0, 0.0):
        raise PrivacyError(
            f"gradient_clip_val={trainer.gradient_clip_val}: the trainer's clipping of the noisy "
            "batch gradient is not DP-SGD's per-example clipping; remove gradient_clip_val and "
            "set DPSGD(max_grad_norm=...)")
    if str(trainer.precision) in ("16-mixed", "16"):
        raise PrivacyError(f"precision={trainer.precision!r} scales the loss by a dynamic factor "
                           "before the per-example gradients are clipped: use 'bf16-mixed' or "
                           "'32-true'")
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        raise PrivacyError("DPSGD supports automatic optimization only; for manual optimization "
                           "call regularizers.dp.privatize_ yourself before optimizer.step()")


check_trainer = check_step


def check_optimizers(optimizers, privatized: list) -> None:
    """Every tensor an optimizer may step must be privatized now: a tensor outside the
    module (a learnable temperature passed beside ``parameters()``) would go out raw."""
    ours = {id(p) for p in privatized}
    stray = [tuple(p.shape) for opt in optimizers for g in opt.param_groups for p in g["params"]
             if id(p) not in ours and (p.requires_grad or p.grad is not None)]
    if stray:
        raise PrivacyError(f"the optimizer steps tensors of shapes {stray} that DP-SGD does not "
                           "privatize (tensors that are not trainable parameters of a module of "
                           "the LightningModule): make them nn.Parameters of a submodule, or "
                           "freeze them")


def check_not_sharded(model: nn.Module, strategy) -> None:
    """FSDP shards parameters across ranks: a rank's hooks see the local shards only, and
    the per-example norms (hence the clip factors) need every shard's share. Not supported."""
    kind = type(strategy).__name__
    sharded = [n for n, p in model.named_parameters() if type(p).__name__ == "DTensor"
               or type(getattr(p, "data", None)).__name__ == "DTensor"]
    if sharded or "FSDP" in kind or "ModelParallel" in kind:
        raise PrivacyError(f"DP-SGD under {kind} (sharded parameters{': ' + sharded[0] if sharded else ''}) "
                           "is not supported: per-example norms would need every shard. Use "
                           "strategy='ddp' (each rank holds the whole model)")
