"""``PrivateTrajectories``: a LightningModule whose parameters are particle trajectories
(particles x times x 2), trained by private mean-field Langevin dynamics (Gu, Chien &
Greenewald, arXiv 2506.12203; the step is ``regularizers.dp_trajectories.core.mfld_step``).

The data module (``toolkit.data.sde.SDESnapshots`` or the digit shapes of
``toolkit.data.shapes.DigitSnapshots``) holds the snapshots; each training step is
one full-batch MFLD step: clipped per-person data gradients of every observed snapshot plus
Gaussian noise calibrated for ``epsilon`` over ``trainer.max_steps`` steps, the data-free
self-interaction and Sinkhorn path energy, and Langevin noise at ``temperature``. Validation
logs W2 to the true marginals at observed and held-out times; the privacy report (same
accountant code as DP-SGD) goes to the run folder as ``dp_report.json``.

Built for CPU: every step copies the particles to numpy for the Sinkhorn plans (64 x 64 plans
are ~10x faster there than through POT's torch backend), a host sync on an accelerator.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from regularizers.dp_trajectories import kernel_bound, mfld_gradient, privacy_report, step_noise, w2
from toolkit.seeding import generator


class PrivateTrajectories(L.LightningModule):
    def __init__(self, n_particles: int = 64, lr: float = 1.0, temperature: float = 1e-3,
                 path_weight: float = 0.02, reg: float = 0.1, epsilon: float = 4.0,
                 delta: float = 1e-6, seed: int = 0, accountant: str = "prv"):
        super().__init__()
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon}: must be > 0 (.inf trains without noise)")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.Z = torch.nn.Parameter(torch.empty(0))
        self.clip = kernel_bound(n_particles)
        self.register_buffer("steps_taken", torch.zeros((), dtype=torch.long))

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        hp = self.hparams
        if self.Z.numel() == 0:
            g = generator(hp.seed, 0)
            self.Z = torch.nn.Parameter(torch.randn(hp.n_particles, len(dm.times), 2, generator=g,
                                                    dtype=torch.float64), requires_grad=True)
        steps = self.trainer.max_steps
        if stage == "fit" and (steps is None or steps < 1):
            raise ValueError("set trainer.max_steps: the noise is calibrated for that many steps")
        if hp.delta >= 1.0 / dm.people:
            raise ValueError(f"delta={hp.delta} must be < 1/people = {1.0 / dm.people:.3g}")
        self.steps = steps
        self.sigma, self.noise_std = step_noise(hp.epsilon, hp.delta, max(steps, 1), self.clip,
                                                dm.adjacency, len(dm.observed), hp.accountant)
        self.data = {s: x.to(self.Z.device) for s, x in dm.snapshots.items()}
        self.counts = {s: float(dm.hparams.people_per_time) for s in self.data}  # public sizes
        self.times = torch.tensor(dm.times, dtype=torch.float64)
        self.gen = generator(hp.seed, 1)

    def configure_optimizers(self):
        # plain SGD on the particles is the MFLD drift step; the Langevin noise follows it
        return torch.optim.SGD([self.Z], lr=self.hparams.lr, momentum=0.0)

    def training_step(self, batch, batch_idx):
        hp = self.hparams
        opt = self.optimizers()
        self.Z.grad = mfld_gradient(self.Z.detach(), self.data, self.times, clip=self.clip,
                                    noise_std=self.noise_std, path_weight=hp.path_weight, reg=hp.reg,
                                    generator=self.gen, counts=self.counts)
        opt.step()
        opt.zero_grad()
        if hp.temperature > 0:
            with torch.no_grad():
                self.Z.add_(math.sqrt(2 * hp.lr * hp.temperature)
                            * torch.randn(self.Z.shape, generator=self.gen, dtype=self.Z.dtype))
        self.steps_taken += 1

    def validation_step(self, batch, batch_idx):
        dm = self.trainer.datamodule
        Z = self.Z.detach().cpu().numpy()
        w = [w2(Z[:, s], dm.truth[:, s]) for s in range(len(dm.times))]
        self.log("val/w2_observed", float(np.mean([w[s] for s in dm.observed])))
        self.log("val/w2_held_out", float(np.mean([w[s] for s in dm.held_out])))

    def on_train_end(self) -> None:
        dm = self.trainer.datamodule
        r = privacy_report(self.sigma, int(self.steps_taken), self.hparams.delta, self.clip,
                           dm.adjacency, len(dm.observed), dm.people, self.hparams.accountant)
        rank_zero_info(f"MFLD privacy report: epsilon={r['epsilon']:.4f} delta={r['delta']:g} "
                       f"sigma={self.sigma:.4g} steps={r['steps']} adjacency={dm.adjacency}")
        log_dir = self.trainer.log_dir
        if log_dir is not None and self.trainer.is_global_zero:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "dp_report.json").write_text(json.dumps(r, indent=2))
