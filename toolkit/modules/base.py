"""Shared optimizer/schedule wiring for the toolkit's LightningModules."""
from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from .optim_config import CLASSIFIER_DEFAULTS, OptimizerConfig, describe_rule  # noqa: F401


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


class TrainModule(L.LightningModule):
    """Builds its optimizer and warmup+decay schedule from one :class:`OptimizerConfig`
    (``self.optim``). Subclasses take the seven settings as ``**optim`` and pass them here, so
    this signature is the only one that lists them; ``None`` keeps the class's
    ``optim_defaults`` (for ``lr``: the optimizer's registered default, ``toolkit optimizers``).
    Every ``__init__`` argument, the resolved settings included, becomes a hyperparameter.
    """

    optim_defaults: OptimizerConfig = CLASSIFIER_DEFAULTS

    def __init__(self, optimizer: str | None = None, lr: float | None = None,
                 weight_decay: float | None = None, optimizer_kwargs: dict[str, Any] | None = None,
                 warmup_steps: int | None = None, lr_decay: str | None = None,
                 min_lr_ratio: float | None = None):
        super().__init__()
        self.optim = self.optim_defaults.resolve(
            optimizer=optimizer, lr=lr, weight_decay=weight_decay,
            optimizer_kwargs=optimizer_kwargs, warmup_steps=warmup_steps, lr_decay=lr_decay,
            min_lr_ratio=min_lr_ratio)
        # collects the subclass's __init__ arguments too (Lightning walks the __init__ frames)
        self.save_hyperparameters()
        self.hparams.update(self.optim.hparams())

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        return self.optim.build(self, total)
