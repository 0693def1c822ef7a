"""What would silently void a DP-SGD guarantee, refused with the fix named."""
from __future__ import annotations

from torch import nn

MIXING_CALLBACKS = ("KMixup", "Mixup", "MixUp", "CutMix", "Cutmix", "BatchMixup")


class PrivacyError(ValueError):
    """A configuration under which the reported epsilon would not hold."""


def check_model(model: nn.Module) -> None:
    """Every example's gradient must depend on that example alone, and no buffer may be
    updated from the data (it would be released without noise)."""
    problems = []
    for name, m in model.named_modules():
        label = name or type(m).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            problems.append(f"{label} ({type(m).__name__}) mixes the examples of a batch and "
                            "keeps data-dependent running statistics: use GroupNorm (e.g. "
                            "Classifier(norm='group')) or LayerNorm")
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            problems.append(f"{label} tracks running statistics of the data: set "
                            "track_running_stats=False or use GroupNorm")
        elif isinstance(m, (nn.RNNBase, nn.MultiheadAttention)):
            problems.append(f"{label} ({type(m).__name__}) keeps its weights out of per-example "
                            "reach: use opacus.layers.DPLSTM/DPGRU/DPMultiheadAttention")
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        has_children = any(True for _ in m.children())
        if own and has_children and not isinstance(m, nn.MultiheadAttention):
            problems.append(f"{label} holds parameters {[n for n, p in m.named_parameters(recurse=False) if p.requires_grad]} "
                            "itself and also has submodules: move them into a leaf module (an "
                            "nn.Linear, or a small module of their own) so their per-example "
                            "gradients can be computed")
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


def check_trainer(trainer) -> None:
    if trainer.accumulate_grad_batches != 1:
        raise PrivacyError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}: accumulating several "
            "noisy Poisson batches into one step is not the mechanism the accountant analyses; "
            "set accumulate_grad_batches: 1 and raise data.batch_size instead (the noise per "
            "example shrinks with the expected batch size)")
    if trainer.gradient_clip_val not in (None, 0, 0.0):
        raise PrivacyError(
            f"gradient_clip_val={trainer.gradient_clip_val}: the trainer's clipping of the noisy "
            "batch gradient is not DP-SGD's per-example clipping; remove gradient_clip_val and "
            "set DPSGD(max_grad_norm=...)")
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        raise PrivacyError("DPSGD supports automatic optimization only; for manual optimization "
                           "call regularizers.dp.privatize_ yourself before optimizer.step()")
