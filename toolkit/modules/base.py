"""Shared optimizer/schedule wiring for the toolkit's LightningModules."""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

import optimizers


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices (int, shape N) or soft targets (float, N x C).

    Soft targets are rows of probabilities (one-hot, mixup/k-mixup labels ...); a one-hot
    row gives exactly the loss of its class index.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    if target.is_floating_point():
        target = target.reshape(-1, target.shape[-1])
        if target.shape != logits.shape:
            raise ValueError(f"soft targets of shape {tuple(target.shape)} do not match logits "
                             f"{tuple(logits.shape)}: give one probability row per example")
        return F.cross_entropy(logits, target)
    return F.cross_entropy(logits, target.reshape(-1))


def hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices from index or soft targets (argmax of each probability row)."""
    return target.argmax(-1) if target.is_floating_point() else target


def log_lm_loss(module: L.LightningModule, loss: torch.Tensor, n: int, metric, stage: str) -> None:
    """Training: the step's loss; evaluation: into ``metric`` (a MeanMetric weighted by the
    batch's n examples), logged per epoch. The LM modules (toolkit GPT, HF) share it."""
    if metric is None:
        module.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
    else:
        metric.update(loss.detach(), weight=n)
        module.log(f"{stage}/loss", metric, prog_bar=True, batch_size=n)


def log_classification(module: L.LightningModule, logits: torch.Tensor, y: torch.Tensor,
                       loss: torch.Tensor, metrics, stage: str) -> None:
    """Training: per-step loss and accuracy (no epoch accumulation needed); evaluation:
    into ``metrics`` ({"acc", "loss"}), logged per epoch. The classifiers share it."""
    n = logits.shape[0]
    if metrics is None:
        acc = (logits.detach().argmax(-1) == hard_labels(y)).float().mean()
        module.log_dict({"train/loss": loss.detach(), "train/acc": acc}, prog_bar=True,
                        batch_size=n)
        return
    metrics["acc"].update(logits.detach(), hard_labels(y))
    metrics["loss"].update(loss.detach(), weight=n)
    module.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, prog_bar=True, batch_size=n)


class LMSteps:
    """Training, validation and test steps of a next-token model (mixin before
    :class:`TrainModule`): the module gives ``lm_loss(batch) -> (loss, examples)`` and
    ``val_loss``/``test_loss`` MeanMetrics; perplexity is logged at each epoch's end."""

    def _step(self, batch, metric, stage: str):
        loss, n = self.lm_loss(batch)
        log_lm_loss(self, loss, n, metric, stage)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, None, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_loss, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_loss, "test")

    def on_validation_epoch_end(self):
        # perplexity: exp of the mean token cross-entropy, from the same metric
        self.log("val/ppl", torch.exp(self.val_loss.compute()))

    def on_test_epoch_end(self):
        self.log("test/ppl", torch.exp(self.test_loss.compute()))


class ClassifierSteps:
    """Training, validation and test steps of a classifier (mixin before :class:`TrainModule`):
    the module gives ``classify(batch) -> (logits, targets)`` (index or soft targets) and
    ``val_metrics``/``test_metrics`` ({"acc", "loss"})."""

    def _step(self, batch, metrics, stage: str):
        logits, y = self.classify(batch)
        loss = cross_entropy(logits, y)
        log_classification(self, logits, y, loss, metrics, stage)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, None, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_metrics, "test")


def describe_rule(rule: dict[str, Any], opt: torch.optim.Optimizer) -> str:
    """One line naming the lr and weight decay a ``weight_decay_rule`` gave each group kind."""
    got = {g.get("kind", "all"): (g.get("lr", math.nan), g.get("weight_decay", 0.0))
           for g in opt.param_groups}
    groups = ", ".join(f"{k}: lr {lr:.4g} weight_decay {wd:.4g}" for k, (lr, wd) in got.items())
    return f"weight_decay_rule {rule} -> {groups}"


class TrainModule(L.LightningModule):
    """Builds its optimizer with :func:`optimizers.build_optimizer` and a warmup+decay schedule.
    ``lr=None`` takes the optimizer's own registered default (``toolkit optimizers``)."""

    def __init__(self, optimizer: str = "adamw", lr: float | None = None, weight_decay: float = 0.0,
                 optimizer_kwargs: dict[str, Any] | None = None, warmup_steps: int = 0,
                 lr_decay: str = "cosine", min_lr_ratio: float = 0.1):
        super().__init__()
        optimizers.check_optimizer_options(optimizer, optimizer_kwargs or {})

    def configure_optimizers(self):
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        kwargs = dict(hp.optimizer_kwargs or {})
        rule = kwargs.get("weight_decay_rule")
        if (rule and rule.get("kind") == "power_lines" and math.isfinite(total)
                and not {"steps", "batch_size", "dataset_size"} & set(rule)):
            kwargs["weight_decay_rule"] = {**rule, "steps": total}  # B / D of this run: 1 / steps
        opt = optimizers.build_optimizer(self, hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
                                         **kwargs)
        if rule:  # the decay a rule chose is otherwise visible nowhere
            rank_zero_info(describe_rule(kwargs["weight_decay_rule"], opt))
        if not math.isfinite(total):
            if hp.lr_decay != "constant":
                raise ValueError("an lr decay needs a known step budget: set trainer.max_steps "
                                 "(or lr_decay: constant)")
            total = 1
        sched = optimizers.warmup_decay(opt, int(total), hp.warmup_steps, hp.lr_decay,
                                        hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
