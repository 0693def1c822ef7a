"""``RadiusControl``: keep every optimizer step inside the softmax convergence radius.

P. Sao, "Ghosts of Softmax" (arXiv 2603.13552): the step controller keeps tau = |delta| <=
r_max * rho_a, rho_a = pi / Delta_a (core.py), rescaling a longer proposed step
delta to delta * r_max * rho_a / tau ("a replacement for gradient clipping": the optimizer,
its lr schedule and its state are untouched, only the applied step is shortened).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from toolkit.batch_keys import INPUT_KEYS, first_key

from ..step_hooks import StepHookCallback
from .core import Radius, radius_from_spread, softmax_radius



def batch_inputs(batch: Any) -> Any:
    """The model inputs of a training batch: a tensor itself, the first entry of a pair, or
    the value of an input-like key of a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, dict) and (k := first_key(batch, INPUT_KEYS)) is not None:
        return batch[k]
    raise TypeError(f"cannot find the model inputs in a batch of type {type(batch).__name__}"
                    f"{' with keys ' + str(sorted(batch)) if isinstance(batch, dict) else ''}: "
                    f"use a tensor, an (inputs, targets) pair or a dict with one of {INPUT_KEYS}")


@torch.no_grad()
def rescale_step_(params: list[torch.Tensor], before: list[torch.Tensor], scale: float) -> None:
    """params <- before + scale * (params - before): the applied step shortened to ``scale``."""
    delta = torch._foreach_sub(params, before)
    torch._foreach_mul_(delta, scale)
    torch._foreach_add_(delta, before)
    torch._foreach_copy_(params, delta)


class RadiusControl(StepHookCallback):
    """After each optimizer step (any optimizer; a post-step hook, as LangevinNoise), measure
    r = tau / rho_a of the step just applied at the pre-step weights on the step's batch, and
    when r > ``r_max`` put back the pre-step weights plus the step scaled by r_max / r.

    ``max_examples`` measures Delta_a on the batch's first rows only (cheaper; the max over
    fewer rows can only under-estimate Delta_a). ``eval_mode`` linearizes with dropout off and
    BatchNorm on running statistics (the reference code's choice), which also keeps buffers
    unchanged. ``method`` picks the JVP: ``"forward_ad"`` (dual tensors in place of the
    parameters, the default) or ``"func"`` (``torch.func.jvp``); the numbers are the same.
    Under DDP Delta_a is the max over ranks, so replicas stay identical.
    Logs ``ghosts/r`` (before control), ``ghosts/rho_a``, ``ghosts/tau`` and ``ghosts/scale``.
    """
    # The step size it applies is a function of the training batch: DP-SGD refuses it, since
    # that rescaling would be a release of the private batch that no noise covers.
    reads_batch_into_update = True

    def __init__(self, r_max: float = 1.0, max_examples: int | None = None,
                 eval_mode: bool = True, method: str = "forward_ad"):
        super().__init__()
        if not (isinstance(r_max, (int, float)) and r_max > 0):  # False for nan
            raise ValueError(f"r_max={r_max!r} must be a number > 0 (1.0 is the radius itself, "
                             "where the paper sees failures begin; inf measures r only)")
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"max_examples={max_examples} must be >= 1, or None for the whole batch")
        if method not in ("forward_ad", "func"):
            raise ValueError(f"method={method!r}: use 'forward_ad' (default) or 'func'")
        self.r_max, self.max_examples, self.eval_mode = float(r_max), max_examples, eval_mode
        self.method = method
        self.scaled = 0
        self.last: dict[str, float] = {}
        self._inputs = None
        self._module = None

    # -- wiring ------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._module = pl_module
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._opts = {}
        for opt in trainer.optimizers:
            ps = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            missing = [tuple(p.shape) for p in ps if id(p) not in names]
            if missing:
                raise ValueError(f"RadiusControl: the optimizer steps tensors {missing[:3]} that "
                                 "are not parameters of the LightningModule; it can only measure "
                                 "the module's own parameters")
            self._opts[id(opt)] = (ps, [names[id(p)] for p in ps], [])
        super().on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = batch_inputs(batch)
        if self.max_examples is not None and isinstance(x, torch.Tensor):
            x = x[:self.max_examples]
        self._inputs = x

    # -- the controller ------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, optimizer) -> None:
        params, _, before = self._opts[id(optimizer)]
        if len(before) != len(params):
            before[:] = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(before, [p.detach() for p in params])

    def after_step(self, optimizer) -> None:
        if self._inputs is None:
            raise RuntimeError("RadiusControl saw an optimizer step outside a training batch; "
                               "it measures the step on the batch it was computed from")
        params, names, before = self._opts[id(optimizer)]
        with torch.no_grad():
            delta = dict(zip(names, torch._foreach_sub([p.detach() for p in params], before)))
        rad = softmax_radius(self._module, self._inputs, delta, dict(zip(names, before)),
                             self.eval_mode, self.method)
        if dist.is_available() and dist.is_initialized():
            spread = torch.tensor([rad.spread], dtype=torch.float64, device=params[0].device)
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            rad = Radius(radius_from_spread(float(spread)), rad.tau, float(spread))
        scale = 1.0
        if rad.r > self.r_max:
            scale = self.r_max / rad.r
            rescale_step_([p.data for p in params], before, scale)
            self.scaled += 1
        self.last = {"r": rad.r, "rho_a": rad.rho, "tau": rad.tau, "scale": scale}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._inputs = None
        if self.last:
            pl_module.log_dict({f"ghosts/{k}": float(v) for k, v in self.last.items()
                                if math.isfinite(v)}, on_step=True, on_epoch=False)

    def _remove(self) -> None:
        super()._remove()
        self._opts, self._module = {}, None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "r_max": self.r_max, "scaled": self.scaled,
                "last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.scaled = state_dict["scaled"]
        self.last = dict(state_dict.get("last", {}))
