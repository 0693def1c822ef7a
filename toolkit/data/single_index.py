"""Gaussian single-index data: x ~ N(0, I_d), y = He_k(<theta*, x>) / sqrt(k!).

The setting of Wei, Damian & Lee, "Improved high-dimensional estimation with Langevin dynamics
and stochastic weight averaging" (arXiv 2603.06028, Sec. 2.2): a hidden unit direction theta*
and the normalized probabilists' Hermite polynomial of degree k* as link, whose information
exponent is k* (Ben Arous et al. 2021). The n training samples are fixed (Langevin runs on
the empirical loss); validation and test draw fresh samples of the same law.
"""
from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..seeding import generator
from .samplers import resumable_loader


def hermite(k: int, z: torch.Tensor) -> torch.Tensor:
    """h_k(z) = He_k(z) / sqrt(k!), orthonormal under N(0, 1), by the three-term recurrence
    He_{j+1} = z He_j - j He_{j-1}."""
    if k < 0:
        raise ValueError(f"Hermite degree k={k} must be >= 0")
    prev, cur = torch.ones_like(z), z
    if k == 0:
        return prev
    for j in range(1, k):
        prev, cur = cur, z * cur - j * prev
    return cur / math.sqrt(math.factorial(k))


def hermite_grad(k: int, z: torch.Tensor) -> torch.Tensor:
    """d/dz h_k(z) = sqrt(k) h_{k-1}(z) (He_k' = k He_{k-1})."""
    return math.sqrt(k) * hermite(k - 1, z) if k > 0 else torch.zeros_like(z)


def check_degree(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"information exponent k={k!r} must be an integer >= 1 (k=1: linear "
                         "link, k=2: phase retrieval-like, k=3, 4: the paper's hard cases); set "
                         "data.k / model.k to one")


def hidden_direction(dim: int, seed: int) -> torch.Tensor:
    """theta*: uniform on the unit sphere S^{dim-1}, a function of the seed alone."""
    v = torch.randn(dim, generator=generator(seed, 0), dtype=torch.float64)
    return (v / v.norm()).float()


def single_index_samples(n: int, theta: torch.Tensor, k: int, seed: int, split: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples (x, y) of split ``split`` (1 train, 2 val, 3 test): each split its own stream."""
    x = torch.randn(n, theta.numel(), generator=generator(seed, split))
    return x, hermite(k, x @ theta)


class SingleIndexDataModule(L.LightningDataModule):
    """``n`` fixed training samples of the single-index model (``batch_size=None``: full batch,
    the empirical loss Langevin dynamics samples from), ``val_size`` fresh samples to validate
    and test. ``theta_star`` is exposed for the module's overlap metric. Resumable like the
    other data modules (the order is a function of seed, epoch and batch)."""

    def __init__(self, dim: int = 32, k: int = 3, n: int = 4096, batch_size: int | None = None,
                 val_size: int = 4096, seed: int = 0):
        super().__init__()
        check_degree(k)
        if dim < 2:
            raise ValueError(f"dim={dim}: the sphere S^(dim-1) needs dim >= 2")
        if n < 1 or (batch_size is not None and not 1 <= batch_size <= n):
            raise ValueError(f"need 1 <= batch_size <= n (got batch_size={batch_size}, n={n}); "
                             "batch_size: null is full batch")
        self.save_hyperparameters()
        self.theta_star = hidden_direction(dim, seed)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_set = TensorDataset(*single_index_samples(hp.n, self.theta_star, hp.k, hp.seed, 1))
        self.val_set = TensorDataset(*single_index_samples(hp.val_size, self.theta_star, hp.k, hp.seed, 2))
        self.test_set = TensorDataset(*single_index_samples(hp.val_size, self.theta_star, hp.k, hp.seed, 3))

    def train_dataloader(self):
        hp = self.hparams
        return resumable_loader(self, self.train_set, hp.batch_size or hp.n, hp.seed)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.val_size)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.hparams.val_size)
