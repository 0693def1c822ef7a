"""SingleIndex: a unit-norm direction w fit to single-index data with the correlation loss.

Wei, Damian & Lee, "Improved high-dimensional estimation with Langevin dynamics and stochastic
weight averaging" (arXiv 2603.06028, Sec. 2.2): the estimator lives on the sphere S^{d-1} and
minimizes the correlation loss L_n(w) = -(1/n) sum_i y_i h_k(<w, x_i>), whose population value
is -<w, theta*>^k for y = h_k(<theta*, x>) (Hermite orthonormality). Spherical (Riemannian)
gradient steps: the loss reads w through w / |w|, so its gradient at |w| = 1 is already the
tangent (Riemannian) gradient, and w is retracted onto the sphere after each optimizer step. Langevin noise comes from
``regularizers.LangevinNoise(manifold="sphere")`` (tangent noise, then retraction) and iterate
averaging from ``regularizers.IterateAveraging``: the module reads its weight as the direction
w / |w|, so the averaged weight swapped in for validation and copied in at fit end is the
paper's estimator, the renormalized average of the iterates.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.single_index import check_degree, hermite
from .base import TrainModule
from .optim_config import OptimizerConfig


class SingleIndex(TrainModule):
    """Logs ``{stage}/loss`` (the correlation loss; on fresh samples it estimates
    -<w, theta*>^k) and, when the data module exposes ``theta_star``, ``{stage}/overlap``
    = |<w/|w|, theta*>|: in training that is the last iterate, in validation and test the
    averaged one when an averaging callback is attached.

    Plain SGD (no momentum, no weight decay) keeps the spherical Langevin discretisation
    exact; other optimizers run, but their update is no longer the Riemannian gradient step.
    """

    # plain SGD at a constant lr (the recipe sets lr 0.1); an unset lr is SGD's registered one
    optim_defaults = OptimizerConfig(optimizer="sgd", lr_decay="constant")

    def __init__(self, dim: int = 32, k: int = 3, **optim: Any):
        super().__init__(**optim)  # optimizer, lr, ...: OptimizerConfig
        check_degree(k)
        if dim < 2:
            raise ValueError(f"dim={dim}: the sphere S^(dim-1) needs dim >= 2")
        w = torch.randn(dim)  # uniform on the sphere (the CLI's seed_everything fixes it)
        self.w = nn.Parameter(w / w.norm())
        self.register_buffer("theta_star", torch.zeros(dim))
        self._has_target = False

    def setup(self, stage: str) -> None:
        theta = getattr(getattr(self.trainer, "datamodule", None), "theta_star", None)
        if theta is None:
            return
        if theta.shape != self.theta_star.shape:
            raise ValueError(f"data dim {theta.numel()} != model.dim {self.hparams.dim}: set both "
                             "to the same value")
        if int(getattr(self.trainer.datamodule.hparams, "k", self.hparams.k)) != self.hparams.k:
            raise ValueError(f"data.k={self.trainer.datamodule.hparams.k} != model.k="
                             f"{self.hparams.k}: the loss must use the link's degree")
        self.theta_star.copy_(theta)
        self._has_target = True

    def direction(self) -> torch.Tensor:
        return self.w / self.w.norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hermite(self.hparams.k, x @ self.direction())

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        loss = -(y * self(x)).mean()
        logs = {f"{stage}/loss": loss.detach()}
        if self._has_target:
            logs[f"{stage}/overlap"] = (self.direction().detach() @ self.theta_star).abs()
        self.log_dict(logs, prog_bar=True, batch_size=len(x))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    @torch.no_grad()
    def _retract(self, *_) -> None:
        self.w.div_(self.w.norm())

    def configure_optimizers(self):
        cfg = super().configure_optimizers()
        # registered before any callback's post-step hook (those attach at fit start), so
        # LangevinNoise(manifold="sphere") adds its noise at the retracted point
        cfg["optimizer"].register_step_post_hook(self._retract)
        return cfg
