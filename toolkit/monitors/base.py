"""Common plumbing of the monitors: measure on logging steps only, write to every logger."""
from __future__ import annotations

from typing import Any

import lightning as L

from .layers import Hooks


class StepMonitor(L.Callback):
    """Runs ``start`` before and ``finish`` after the training batch of every
    ``every_n_steps``-th optimizer step (step 0 included); hooks that ``start`` adds to
    ``self.hooks`` are removed right after that batch, so between logging steps the model
    carries none and pays nothing. Only the first forward of a logging step is measured
    (gradient accumulation and two-pass optimizers such as SAM run several)."""

    def __init__(self, every_n_steps: int = 50):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r}: give a positive integer")
        self.every_n_steps = every_n_steps
        self.hooks = Hooks()
        self._measured_step = -1
        self._active = False

    def start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> None:
        raise NotImplementedError

    def finish(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        raise NotImplementedError

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._measured_step:
            return
        self._measured_step, self._active = step, True
        self.start(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        self.hooks.remove()
        self._active = False
        self.finish(trainer, pl_module, self._measured_step)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.hooks.remove()
        self._active = False


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Straight to the loggers: ``self.log`` would drop values between ``log_every_n_steps``."""
    metrics = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
