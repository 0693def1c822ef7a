"""``LRSpike``: multiply every param group's lr by ``factor`` for a few optimizer steps.

The stress test of P. Sao, "Ghosts of Softmax" (arXiv 2603.13552, the lr-spike experiment;
reference experiments/lrspike): a transient lr spike, against which a step controller
(RadiusControl) is compared with gradient clipping and no control.
"""
from __future__ import annotations

import math

from ..step_hooks import StepHookCallback


class LRSpike(StepHookCallback):
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
        self._saved: list[float] = []

    def active(self) -> bool:
        return self.start <= self.steps < self.start + self.length

    def before_step(self, optimizer) -> None:
        self._saved = [g["lr"] for g in optimizer.param_groups]
        if self.active():
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.factor

    def after_step(self, optimizer) -> None:
        for g, lr in zip(optimizer.param_groups, self._saved):
            g["lr"] = lr
