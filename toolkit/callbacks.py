"""Default callbacks the CLI adds: RNG state in checkpoints, a plain progress printer and a
guard that stops at the first non-finite loss or gradient before it is applied."""
from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import lightning as L
import random

import numpy as np
import torch
from lightning.pytorch.callbacks import ProgressBar


class RNGState(L.Callback):
    """Keeps torch (CPU and every CUDA device), numpy and python RNG states in the checkpoint,
    so dropout, mixing and noise continue exactly on resume (Lightning restores weights and
    loops, not RNGs). Where exact resume holds (one CPU or CUDA process; DDP ranks that draw
    alike): docs/devices.md and :func:`restore_cuda_rng`."""

    def state_dict(self) -> dict[str, Any]:
        # Plain tensors/ints only, so checkpoints load with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
        if torch.cuda.is_available():  # one state per visible device, on CPU (ByteTensors)
            rng["cuda"] = list(torch.cuda.get_rng_state_all())
            rng["cuda_device"] = torch.cuda.current_device()
        return {"rng": rng}

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
            restore_cuda_rng(pending.get("cuda"), pending.get("cuda_device", 0))
            self._pending = None


def restore_cuda_rng(states: list[torch.Tensor] | None, saved_device: int = 0) -> None:
    """Put saved per-device CUDA generator states back, then give this process's current
    device the state of the device the saving process drew on (``saved_device``).

    Under DDP only rank 0 writes the file, and rank r draws on ``cuda:r``: every rank is seeded
    alike by ``seed_everything`` and draws the same number of values per step (same shapes),
    so rank 0's device state is each rank's own, and the second step hands it to ``cuda:r``.
    A checkpoint from a CPU run has no CUDA states (the generators keep their seeded state)."""
    if not states or not torch.cuda.is_available():
        return
    n = torch.cuda.device_count()
    if len(states) > n:
        warnings.warn(f"the checkpoint holds RNG states of {len(states)} CUDA devices; this "
                      f"process sees {n}: devices {n}..{len(states) - 1} are not restored",
                      stacklevel=2)
    torch.cuda.set_rng_state_all(states[:n])
    if saved_device < len(states):
        torch.cuda.set_rng_state(states[saved_device], torch.cuda.current_device())


class PlainProgress(ProgressBar):
    """One line at the first step, then every ``every`` steps and at each validation, with
    elapsed time and ETA: readable in CI logs and files where a live bar would print carriage
    returns, and a first run shows it is alive within seconds instead of after ``every``."""

    def __init__(self, every: int = 50):
        super().__init__()
        self.every, self._enabled = every, True
        self._t0, self._step0, self._printed = time.time(), 0, -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer, pl_module) -> None:
        # the clock and the rate start here, after data set-up and a resume's restore
        self._t0, self._step0 = time.time(), trainer.global_step

    def _eta(self, trainer, total) -> str:
        done, elapsed = trainer.global_step - self._step0, time.time() - self._t0
        if done <= 0 or not total or total == float("inf"):
            return ""
        left = elapsed / done * max(total - trainer.global_step, 0)
        return f" eta {int(left // 60)}m{int(left % 60):02d}s"

    def _print(self, trainer, what: str) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, trainer.lightning_module).items()
                   if k != "v_num"}
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        print(f"[{time.time() - self._t0:7.1f}s] epoch {trainer.current_epoch} step "
              f"{trainer.global_step}/{total}{self._eta(trainer, total)} {what}{shown}",
              file=sys.stdout, flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._printed and (step == self._step0 + 1 or step % self.every == 0):
            self._printed = step
            self._print(trainer, "")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._print(trainer, "(validation) ")

    def on_test_end(self, trainer, pl_module) -> None:
        self._print(trainer, "(test) ")


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient; the update was not applied."""


class FiniteGuard(L.Callback):
    """Stops training at the first step whose loss or gradient is not finite, *before* the
    optimizer applies it: a NaN update poisons every weight and the run would go on training
    on NaNs, and with ``save_on_exception`` off (the default) the last checkpoint stays the
    last good one. The error names the step, the batch and, for gradients, the parameters.

    Gradients are not checked under fp16 mixed precision: its GradScaler already skips steps
    with overflowing gradients and lowers the scale, which is its normal operation.

    The losses of the step (every micro-batch under gradient accumulation) and the gradient
    norms are checked together just before the step: one host sync per optimizer step, the
    price of stopping before a non-finite update is applied (docs/devices.md).

    Under a callback that privatizes gradients (``privatizes_gradients``, e.g. DPSGD) the
    loss is private: one example's non-finite loss would stop the run at a data-dependent
    step. Then only the released, noised update is checked (DPSGD writes it after the
    backward, before any ``on_before_optimizer_step``)."""

    _batch_idx = -1
    _private = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._private = any(getattr(cb, "privatizes_gradients", False) for cb in trainer.callbacks)

    def __init__(self):
        self._losses: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self._losses = []  # nothing left over from a fit that stopped mid-step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self._private:
            return
        # kept on the device: the one host sync of the check happens before the step
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._losses = self._losses, []
        flags = [torch.isfinite(l).all() for l in losses]
        grads = [] if getattr(trainer.precision_plugin, "scaler", None) is not None else \
            [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            flags.append(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])).all())
        if not flags or bool(torch.stack(flags).all()):  # the step's one host sync
            return
        for loss in losses:
            if not bool(torch.isfinite(loss).all()):
                self._stop(trainer, f"the loss is {loss.flatten()[:4].tolist()}")
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = [names.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]
               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        self._stop(trainer, f"the gradient of {bad[:5]}{' ...' if len(bad) > 5 else ''} is not "
                            "finite (the loss was)")

    def _stop(self, trainer, what: str) -> None:
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
        raise NonFiniteError(
            f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx}): "
            f"{what}. This "
            f"update was not applied and training stopped; last checkpoint: {last}. Lower the "
            "lr or warm it up, set trainer.gradient_clip_val, or check this batch; then resume "
            "with --ckpt_path last.")
