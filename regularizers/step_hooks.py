"""``StepHookCallback``: the lifecycle every callback that acts around ``optimizer.step()`` shares.

A subclass defines ``before_step`` and/or ``after_step`` (torch's optimizer step pre/post hooks:
they hold for any optimizer, lr schedule, AMP's skipped steps and manual optimization). The
hooks go on every optimizer at fit start and come off at fit end or on an exception; ``steps``
counts the optimizer steps taken and is kept in checkpoints, so a resumed run continues the
same per-step schedule or random stream.
"""
from __future__ import annotations

from typing import Any

import lightning as L


class StepHookCallback(L.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0
        self._handles: list = []

    def before_step(self, optimizer) -> None:
        """Runs just before each ``optimizer.step()``."""

    def after_step(self, optimizer) -> None:
        """Runs just after each ``optimizer.step()``, before ``steps`` counts it."""

    def _pre(self, optimizer, args, kwargs) -> None:
        self.before_step(optimizer)

    def _post(self, optimizer, args, kwargs) -> None:
        self.after_step(optimizer)
        self.steps += 1

    def on_fit_start(self, trainer, pl_module) -> None:
        self._unhook()  # a second fit with the same callback hooks once, not twice
        for opt in trainer.optimizers:
            if type(self).before_step is not StepHookCallback.before_step:
                self._handles.append(opt.register_step_pre_hook(self._pre))
            self._handles.append(opt.register_step_post_hook(self._post))

    def _unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _remove(self) -> None:
        """Undo what fit start set up (subclasses add their own state)."""
        self._unhook()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = state_dict["steps"]
