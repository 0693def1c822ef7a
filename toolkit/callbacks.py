"""Default callbacks the CLI adds: RNG state in checkpoints and a plain progress printer."""
from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
import random

import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar


class RNGState(L.Callback):
    """Keeps torch/numpy/python RNG states in the checkpoint so dropout, mixing and noise
    continue exactly on resume (Lightning restores weights and loops, not RNGs)."""

    def state_dict(self) -> dict[str, Any]:
        # Plain tensors/ints only, so checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        return {"rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict["rng"]

    def on_train_start(self, trainer, pl_module) -> None:
        # Restored states are applied here, after anything that re-seeds during setup.
        pending = getattr(self, "_pending", None)
        if pending is not None:
            torch.set_rng_state(pending["torch"])
            random.setstate(pending["python"])
            name, keys, pos, has_gauss, gauss = pending["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            self._pending = None


class PlainProgress(ProgressBar):
    """One line every ``every`` steps and at each validation: readable in CI logs and files
    where a live bar would print carriage returns."""

    def __init__(self, every: int = 50):
        super().__init__()
        self.every, self._enabled, self._t0 = every, True, time.time()

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer, what: str) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, trainer.lightning_module).items()
                   if k != "v_num"}
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        print(f"[{time.time() - self._t0:7.1f}s] epoch {trainer.current_epoch} step "
              f"{trainer.global_step}/{total} {what} {shown}", file=sys.stdout, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._print(trainer, "")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._print(trainer, "(validation)")

    def on_test_end(self, trainer, pl_module) -> None:
        self._print(trainer, "(test)")
