"""``QKClip``: MuonClip's QK-clip (Kimi K2, arXiv 2507.20534) as a step control; the functional
core is :mod:`.core`."""
from __future__ import annotations

import math
from typing import Any

import torch

from toolkit.monitors.base import log_metrics

from ..step_hooks import StepHookCallback
from .core import attention_modules, clip_forward_, clip_measured_, watch_forward

MEASURES = ("post_step", "forward")


class QKClip(StepHookCallback):
    """After each optimizer step, caps every attention head's largest pre-softmax logit at
    ``tau`` by rescaling its query rows by ``(tau / max)^alpha`` and key rows by
    ``(tau / max)^(1 - alpha)`` (Kimi K2's QK-clip, arXiv 2507.20534, Sec. 2.1, Algorithm 1).

    ``measure="post_step"`` (the default): after the step one no-grad eval-mode forward on the
    step's batch (or ``public_inputs``) measures each layer's logits with the updated weights and
    clips it before the next layer runs (:func:`.core.clip_forward_`), so after the step every
    head's max logit on that batch is <= tau exactly, the guarantee the stress recipe checks by
    separate code. Cost: that extra forward.

    ``measure="forward"`` (opt in; Kimi K2's MuonClip order, no extra forward): the
    per-head max logit is taken in the step's own training forward from the q/k its attention
    projections already computed (:func:`.core.watch_forward`; adds q.k^T and a max per layer,
    no extra forward), i.e. it is the logit *before* the update, and the heads above tau are
    rescaled after the optimizer step. The logit *after* the step is then not capped exactly: it
    is tau times whatever growth that one update gave the head (the stress recipe measures it by
    separate code and reports how far above tau it goes: up to 33% at tau 30 there).

    Logs ``qk_clip/max_logit/layer{i}`` (the measured max, before clipping) and
    ``qk_clip/clipped/layer{i}`` (heads clipped) on logging steps (``trainer.log_every_n_steps``)
    only, so other steps never wait on the device. ``clipped_total`` (heads clipped over the
    run) is kept in checkpoints.

    Privacy: both measures read the private training batch into the update, which DP-SGD's
    noise does not cover, so QKClip is refused beside a ``DPSGD`` callback unless it is given
    ``public_inputs`` (a batch of public model inputs, e.g. token ids), measured post-step.
    """

    def __init__(self, tau: float = 100.0, alpha: float = 0.5, public_inputs: Any = None,
                 measure: str = "post_step"):
        super().__init__()
        if measure not in MEASURES:
            raise ValueError(f"QKClip measure={measure!r} is not one of {MEASURES}")
        if measure == "forward" and public_inputs is not None:
            raise ValueError("QKClip(measure='forward') reads the training forward's logits; "
                             "public_inputs needs measure='post_step'")
        self.measure = measure
        self._store: list = []
        self._watch: list = []
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (
                math.isfinite(tau) and tau > 0):
            raise ValueError(f"QKClip tau={tau!r} must be a finite number > 0 (the logit cap; "
                             "Kimi K2 uses 100)")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"QKClip alpha={alpha!r} must be in [0, 1] (the share of the scaling "
                             "put on the queries; 0.5 splits it evenly)")
        self.tau, self.alpha, self.public_inputs = float(tau), float(alpha), public_inputs
        self.clipped_total = 0
        self._pending: torch.Tensor | int = 0  # heads clipped since the last logging step
        self.last: dict[str, float] = {}
        self._batch = None
        self._modules: list = []
        self._trainer = None
        self._net = None

    @property
    def reads_batch_into_update(self) -> bool:
        """True unless it measures on public inputs (DP-SGD refuses such callbacks)."""
        return self.public_inputs is None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.reads_batch_into_update:
            dp = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ == "DPSGD"]
            if dp:
                raise ValueError("QKClip rescales weights from logits measured on the training "
                                 "batch, a release of the private batch that DP-SGD's noise does "
                                 "not cover: pass QKClip(public_inputs=<a public batch>) or remove "
                                 "it from a DP-SGD run")
        net = getattr(pl_module, "model", None)
        self._net = net if isinstance(net, torch.nn.Module) else pl_module
        self._modules = attention_modules(self._net)
        self._trainer = trainer
        super().on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = batch if self.public_inputs is None else self.public_inputs
        if self.measure == "forward" and not self._watch:
            self._watch = watch_forward(self._modules, self._store)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._unwatch()

    def _unwatch(self) -> None:
        for h in self._watch:
            h.remove()
        self._watch = []

    def after_step(self, optimizer) -> None:
        if self._batch is None:
            return
        if self.measure == "forward":
            stats = clip_measured_(self._modules, self._store, self.tau, self.alpha)
        else:
            stats = clip_forward_(self._net, self._batch, self._modules, self.tau, self.alpha)
        clipped = torch.stack([c for _, c in stats]) if stats else torch.zeros(0)
        self._pending = self._pending + clipped.sum()
        trainer = self._trainer
        every = getattr(trainer, "log_every_n_steps", 50) or 1
        if self.steps % every == 0:  # logging step: the only host sync
            self.clipped_total += int(self._pending)
            self._pending = 0
            self.last = {}
            for i, (m, c) in enumerate(stats):
                self.last[f"qk_clip/max_logit/layer{i}"] = float(m.max())
                self.last[f"qk_clip/clipped/layer{i}"] = float(c)
            if self.last:
                self.last["qk_clip/max_logit/max"] = max(
                    v for k, v in self.last.items() if k.startswith("qk_clip/max_logit/layer"))
                log_metrics(trainer, self.last, self.steps)

    def _remove(self) -> None:
        super()._remove()
        self._unwatch()
        self._batch = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clipped_total": self.clipped_total + int(self._pending)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.clipped_total, self._pending = state_dict.get("clipped_total", 0), 0
