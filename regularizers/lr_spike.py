"""``LRSpike``: multiply every param group's lr by ``factor`` for a few optimizer steps.

The stress test of P. Sao, "Ghosts of Softmax" (arXiv 2603.13552, the lr-spike experiment;
reference experiments/lrspike): a transient lr spike, against which a step controller
(RadiusControl) is compared with gradient clipping and no control.
"""
from __future__ import annotations

import math
from typing import Any

import lightning as L


class LRSpike(L.Callback):
    """Optimizer steps ``start <= step < start + length`` (counted from 0 over the run, kept in
    checkpoints) use ``factor`` x each group's scheduled lr; the lr is put back after the step,
    so the schedule and any lr monitor are unaffected outside the spike."""

    def __init__(self, start: int, length: int = 1, factor: float = 1e4):
        super().__init__()
        if start < 0 or length < 1:
            raise ValueError(f"start={start}, length={length}: need start >= 0 and length >= 1")
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor={factor} must be a finite number > 0")
        self.start, self.length, self.factor = start, length, float(factor)
        self.steps = 0
        self._handles: list = []
        self._saved: list[float] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for opt in trainer.optimizers:
            self._handles += [opt.register_step_pre_hook(self._before),
                              opt.register_step_post_hook(self._after)]

    def active(self) -> bool:
        return self.start <= self.steps < self.start + self.length

    def _before(self, optimizer, args, kwargs) -> None:
        self._saved = [g["lr"] for g in optimizer.param_groups]
        if self.active():
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.factor

    def _after(self, optimizer, args, kwargs) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved):
            g["lr"] = lr
        self.steps += 1

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict["steps"]
