"""What ``DPSGD(noise="bandmf")`` keeps between steps: strategy, split, noise history.

Choquette-Choo et al., "(Amplified) Banded Matrix Factorization", NeurIPS 2023: step t
adds ``x_t = (C^-1 z)_t`` (:class:`.bandmf.BandedNoise`) to the clipped sum of a batch
Poisson-sampled from partition ``t mod b`` (:mod:`.cyclic_poisson`), and the run is
accounted as DP-SGD on one partition with noise multiplier ``sigma / ||c||``, one ledger
step per cycle of ``b`` steps (charged at the cycle's first step, before anyone in it
participates). ``t`` counts the steps released under this ledger, not the trainer's step:
a second ``fit`` restarts the trainer at 0, the cycle must not.

Resume. The checkpoint holds the split seed (a new split would put an example into two
partitions less than ``b`` steps apart) and the last ``b - 1`` released noise vectors ``x``
(the recursion needs them). The ``z`` of every fit are fresh (``DPSGD``'s fresh-noise rule):
the noise released over the whole run is still ``C^-1 z`` with ``z`` i.i.d. Gaussian, only
not the ``z`` an uninterrupted run with the same seed would have drawn. Because the history
is secret (subtracting ``x_{t-1}`` from step t-1's update reveals its clipped sum), such a
checkpoint must be kept as private as the training data; the weights alone may be shared.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .bandmf import STRATEGIES, BandedNoise, sensitivity, strategy
from .cyclic_poisson import CyclicPoissonBatchSampler, participations, partition_sample_rate
from .errors import PrivacyError
from .loader import PrivateData, batch_size, why_not_once_per_pass
from .sampling import PoissonLoader

ANALYSIS = ("amplified banded matrix factorization (Choquette-Choo et al. 2023, Thm. 4): "
            "cyclic Poisson sampling over b fixed partitions, each cycle of b steps one "
            "Poisson-subsampled Gaussian release at noise multiplier sigma / ||c|| "
            "(add/remove adjacency)")


def check_config(noise: str, bands: Any, strategy_name: str, sampling: str) -> None:
    if noise not in ("gaussian", "bandmf"):
        raise ValueError(f"noise={noise!r}: choose 'gaussian' (independent, DP-SGD) or "
                         "'bandmf' (banded matrix factorization)")
    if noise == "gaussian":
        return
    if isinstance(bands, bool) or not isinstance(bands, int) or bands < 1:
        raise ValueError(f"bands={bands!r}: need an integer >= 1 (1 = DP-SGD's independent "
                         "noise; 2-8 typical)")
    if strategy_name not in STRATEGIES:
        raise ValueError(f"strategy={strategy_name!r}: choose one of {STRATEGIES}")
    if sampling != "poisson":
        raise ValueError(f"noise='bandmf' with sampling={sampling!r}: BandMF's accounting needs "
                         "the cyclic Poisson sampling DPSGD builds itself; use "
                         "sampling='poisson' (the default)")


class BandMF:
    """The callback's BandMF state (module docstring). ``released`` counts the noise vectors
    released under this ledger, on rank 0 and elsewhere alike."""

    def __init__(self, bands: int, strategy_name: str):
        self.bands, self.strategy = bands, strategy_name
        self.coefs: list[float] | None = None  # fixed at the first fit, kept in checkpoints
        self.split_seed: int | None = None
        self.released = 0
        self.noise: BandedNoise | None = None
        self._saved: dict | None = None  # a checkpoint's noise state, applied on first draw
        self.sampler: CyclicPoissonBatchSampler | None = None

    # ----------------------------------------------------------- set-up
    def plan(self, planned_steps: float) -> None:
        """Fix the strategy at the first fit; refuse what makes it meaningless."""
        if math.isfinite(planned_steps) and planned_steps < self.bands:
            raise PrivacyError(f"bands={self.bands} but only {int(planned_steps)} steps are "
                               "planned: a band longer than the run gives no correlation to "
                               f"use; use bands <= {max(1, int(planned_steps))}")
        if self.coefs is not None:
            return
        if self.strategy == "optimized" and not math.isfinite(planned_steps):
            raise PrivacyError("strategy='optimized' is optimized for the run's length: set "
                               "trainer.max_steps or max_epochs, or use strategy='bsr'")
        n = int(planned_steps) if math.isfinite(planned_steps) else None
        self.coefs = [float(c) for c in strategy(self.strategy, self.bands, n)]

    @property
    def column_norm(self) -> float:
        return sensitivity(self.coefs)

    def loader(self, loader, world: int, rank: int, seed: int, first_step,
               users=None) -> PrivateData:
        """The cyclic Poisson loader over the user's map-style dataset (same refusals as
        the Poisson loader), q relative to the public partition size ``N // b``. With
        ``users`` (:class:`.user_unit.UserLevel`) the partitions and draws are over its
        units: users (uls), each drawn user giving up to k examples, or capped examples."""
        why = why_not_once_per_pass(loader)
        if why is not None:
            raise PrivacyError(f"cannot account for the training data under noise='bandmf': "
                               f"{why}. Give a map-style dataset in a plain DataLoader")
        dataset = users.dataset(loader.dataset) if users else loader.dataset
        n = users.num_units() if users else len(dataset)
        expected = batch_size(loader) * world
        if n < self.bands:
            raise PrivacyError(f"{n} {users.unit_name if users else 'examples'} cannot fill "
                               f"bands={self.bands} partitions; use bands <= {n}")
        try:
            q = partition_sample_rate(expected, n, self.bands)
        except ValueError as e:
            raise PrivacyError(f"noise='bandmf', bands={self.bands}: {e}") from None
        if self.split_seed is None:
            self.split_seed = seed  # as secret as this first fit's seed; kept from now on
        self.sampler = CyclicPoissonBatchSampler(n, q, max(1, round(n / expected)), self.bands,
                                                 world, rank, seed, self.split_seed, first_step)
        self.num_samples = n
        sampler = users.wrap(self.sampler) if users else self.sampler
        return PrivateData(PoissonLoader(dataset, sampler, loader.collate_fn, loader.num_workers,
                                         loader.pin_memory),
                           len(users.users) if users else n, q, expected)

    def start(self, global_step: int) -> None:
        """Align the sampler's partition cycle with the released steps."""
        if self.sampler is not None:
            self.sampler.offset = self.released - global_step

    # ----------------------------------------------------------- per step
    def charges_next(self) -> bool:
        """Whether the next release starts a cycle (one more ledger step)."""
        return self.released % self.bands == 0

    def check_aligned(self, global_step: int) -> None:
        if self.sampler is not None and global_step + self.sampler.offset != self.released:
            raise PrivacyError(f"release {self.released} drew partition "
                               f"{(global_step + self.sampler.offset) % self.bands}, not "
                               f"{self.released % self.bands}: a training step released nothing "
                               "(training_step returned None, or several optimizer steps per "
                               "batch), which breaks BandMF's cyclic schedule; release one "
                               "update per batch")

    def draw(self, n: int, std: float, generator, device, dtype) -> torch.Tensor:
        """``noisy_mean_``'s noise: the next ``(C^-1 z)_t`` (rank 0 only), the noise state's
        own row (``BandedNoise.draw_``): read, never written."""
        if self.noise is None or self.noise.numel != n:
            if self.noise is not None or (self._saved is not None and
                                          self._saved["history"].shape[1] != n):
                raise PrivacyError(f"the privatized parameters now hold {n} numbers, BandMF's "
                                   "noise history was kept for a different set: noise='bandmf' "
                                   "needs one trainable set for the whole run (freeze or "
                                   "unfreeze before training starts)")
            self.noise = BandedNoise(self.coefs, n, device=device, dtype=dtype)
            if self._saved is not None:
                self.noise.load_state_dict(self._saved)
            self.noise.step = self.released
            self._saved = None
        return self.noise.draw_(std, generator)

    def released_one(self) -> None:
        self.released += 1

    # ----------------------------------------------------------- checkpoint, report
    def state_dict(self) -> dict:
        state = {"bands": self.bands, "strategy": self.strategy, "coefs": self.coefs,
                 "split_seed": self.split_seed, "released": self.released}
        noise = self.noise.state_dict() if self.noise is not None else self._saved
        return {**state, "history": noise["history"] if noise else None}

    def load_state_dict(self, state: dict) -> None:
        if (state["bands"], state["strategy"]) != (self.bands, self.strategy):
            raise PrivacyError(f"the checkpoint ran noise='bandmf' with bands={state['bands']}, "
                               f"strategy={state['strategy']!r}; resume with the same")
        self.coefs, self.split_seed = list(state["coefs"]), state["split_seed"]
        self.released = int(state["released"])
        self.noise = None
        h = state["history"]
        self._saved = None if h is None else {"coefs": self.coefs, "step": self.released,
                                              "history": h}

    def report(self, sigma: float | None) -> dict:
        k = participations(self.released, self.bands)
        return {"noise": "bandmf", "bands": self.bands, "strategy": self.strategy,
                "coefs": self.coefs, "column_norm": self.column_norm if self.coefs else None,
                "accounted_noise_multiplier": sigma / self.column_norm if sigma and self.coefs
                else None, "participations_per_example": k, "analysis": ANALYSIS}
