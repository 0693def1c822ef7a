"""``SpectralMonitor``: the spectral-condition ratios of :mod:`.core` on logging steps.
"""
from __future__ import annotations

import torch
from torch import nn

from optimizers import classify_parameters
from optimizers.orientation import spectral_scale, stacked_names, transposed_names
from optimizers.sharded import is_dtensor

from ...seeding import generator
from ..base import StepMonitor, log_metrics
from .core import power_iteration


class SpectralMonitor(StepMonitor):
    """Logs ``spectral/W/<param>`` = ||W||_2 / sqrt(fan_out/fan_in) and ``spectral/dW/<param>``
    (the update since the last logging step) for every hidden matrix (the optimizer
    factory's ``hidden`` kind), plus their ``mean``/``max``. Power-iteration vectors and
    the previous weights live in the checkpoint state, so a resumed run continues exactly."""

    def __init__(self, every_n_steps: int = 50, iters: int = 5, seed: int = 0):
        super().__init__(every_n_steps)
        self.iters, self.seed = iters, seed
        self.vectors: dict[str, torch.Tensor] = {}
        self.previous: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] = {}

    def _vector(self, key: str, M: torch.Tensor) -> torch.Tensor:
        if key not in self.vectors:
            # drawn on CPU deliberately, once per matrix: the same start on every device;
            # power_iteration moves it once and returns it on the weight's device
            g = generator(self.seed, len(self.vectors))
            self.vectors[key] = torch.randn(M[0].numel(), generator=g)
        return self.vectors[key]

    def _sigma(self, key: str, W: torch.Tensor, stacked: bool) -> float:
        """Top singular value of ``W``; of each expert ``W[e]`` (largest returned) if ``stacked``."""
        if not stacked:
            sigma, self.vectors[key] = power_iteration(W, self._vector(key, W), self.iters)
            return sigma
        sigmas = []
        for e, M in enumerate(W.unbind(0)):
            k = f"{key}[{e}]"
            sigma, self.vectors[k] = power_iteration(M, self._vector(k, M), self.iters)
            sigmas.append(sigma)
        return max(sigmas)

    @torch.no_grad()
    def measure(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        flipped, stacks = transposed_names(model), stacked_names(model)
        for name, p in classify_parameters(model)["hidden"]:
            W = p.detach().full_tensor() if is_dtensor(p) else p.detach()  # FSDP2: gather
            stacked = name in stacks
            scale = spectral_scale(W.shape, name in flipped, stacked)
            out[f"W/{name}"] = self._sigma(name, W, stacked) / scale
            if name in self.previous:
                dW = W - self.previous[name].to(W.device)
                out[f"dW/{name}"] = self._sigma(f"dW:{name}", dW, stacked) / scale
            self.previous[name] = W.detach().to("cpu", copy=True)
        for kind in ("W", "dW"):
            vals = [v for k, v in out.items() if k.startswith(kind + "/")]
            if vals:
                out[f"{kind}/mean"], out[f"{kind}/max"] = sum(vals) / len(vals), max(vals)
        return out

    def start(self, trainer, pl_module, batch) -> None:
        # Weights as the optimizer left them after ``global_step`` updates.
        self.last = self.measure(pl_module)

    def finish(self, trainer, pl_module, step: int) -> None:
        log_metrics(trainer, {f"spectral/{k}": v for k, v in self.last.items()}, step)

    def state_dict(self) -> dict:
        return {"vectors": dict(self.vectors), "previous": dict(self.previous),
                "measured_step": self._measured_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.vectors = dict(state_dict["vectors"])
        self.previous = dict(state_dict["previous"])
        self._measured_step = state_dict.get("measured_step", -1)
