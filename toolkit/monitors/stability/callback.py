"""``StabilityMonitor``: the HyperP stability indicators of :mod:`.core` on logging steps.
"""
from __future__ import annotations

from ..base import StepMonitor, log_metrics
from ..layers import resolve_layers
from .core import OUTLIER_K, StabilityProbe


class StabilityMonitor(StepMonitor):
    """Logs the HyperP indicators as ``stability/<indicator>/layer{i}`` (and ``/mean``,
    ``/max``; ``stability/logit_z``) on the training forward of every ``every_n_steps``-th
    step; no hooks exist in between."""

    def __init__(self, every_n_steps: int = 50, layers: str | list[str] = "auto",
                 outlier_k: float = OUTLIER_K):
        super().__init__(every_n_steps)
        self.layers_arg, self.outlier_k = layers, outlier_k
        self.last: dict[str, float] = {}
        self._probe: StabilityProbe | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Not in setup: LightningModules may build their model later, in configure_model.
        self._probe = StabilityProbe(pl_module, resolve_layers(pl_module, self.layers_arg),
                                         self.outlier_k)

    def start(self, trainer, pl_module, batch) -> None:
        self._probe.attach(self.hooks)

    def finish(self, trainer, pl_module, step: int) -> None:
        self.last = self._probe.collect()
        if self.last:
            log_metrics(trainer, {f"stability/{k}": v for k, v in self.last.items()}, step)
