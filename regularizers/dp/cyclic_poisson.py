"""Cyclic Poisson sampling and the amplified BandMF accounting that rests on it.

Choquette-Choo et al., "(Amplified) Banded Matrix Factorization", NeurIPS 2023, Alg. 2 and
Thm. 4: split the data once into ``b`` fixed partitions (the split may be public); step t
Poisson-samples, with rate q, from partition ``t mod b`` only. Every example then takes
part at most once in any ``b`` consecutive steps (b-min-separation), so with a b-banded
strategy C its participations touch disjoint row blocks of ``C G`` and the whole run is
accounted as DP-SGD on one partition: sample rate q, ``ceil(steps / b)`` steps, noise
multiplier ``sigma / sens(C)`` where ``sens(C)`` is C's maximum column norm and sigma is
the std of z in units of the clipping norm. jax-privacy makes the same reduction in
``toeplitz._AmplifiedBandMFHelper.total_noise_multiplier``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from toolkit.seeding import generator

from .accounting import calibrate_sigma, epsilon
from .bandmf import sensitivity
from .sampling import fresh_seed

# Generator streams (toolkit.seeding.generator(seed, stream, ...)). The draws use stream 0,
# PoissonBatchSampler's (sampling.step_generator), so with bands=1 (one part: all indices
# in order) the batches are DP-SGD's exactly; the split has its own stream.
SPLIT_STREAM, DRAW_STREAM = 11, 0


def partitions(num_samples: int, bands: int, seed: int) -> list[torch.Tensor]:
    """The b fixed partitions: example i joins part ``a_i``, drawn independently and
    uniformly from {0..b-1} by the generator (seed, SPLIT_STREAM) at position i.

    Independent, not a cut of a permutation into equal parts: adding or removing one
    example then leaves every other example's part (and its distribution) unchanged, so
    the add/remove analysis of Thm. 4, which holds for every fixed split, holds for the
    mixture over splits (joint convexity). A balanced cut would move other examples
    between parts when N changes. The CPU generator is prefix-stable: dropping the last
    example keeps every other ``a_i`` bit for bit. The sizes are Binomial(N, 1/b); the
    sample rate and the normalization use the public ``N // b``."""
    if not isinstance(bands, int) or bands < 1:
        raise ValueError(f"bands={bands!r}: need an integer >= 1")
    if num_samples < bands:
        raise ValueError(f"{num_samples} examples cannot fill {bands} partitions; use "
                         f"bands <= {num_samples}")
    a = torch.randint(0, bands, (num_samples,), generator=generator(seed, SPLIT_STREAM))
    return [(a == k).nonzero().squeeze(1) for k in range(bands)]


def cyclic_poisson_batch(parts: Sequence[torch.Tensor], step: int, sample_rate: float,
                         seed: int) -> torch.Tensor:
    """Step ``step``'s indices: each example of partition ``step mod b`` independently
    with probability ``sample_rate``. Depends on (seed, step) only, so resumes and DDP
    ranks redraw the same batch."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate {sample_rate} must lie in (0, 1]")
    part = parts[step % len(parts)]
    u = torch.rand(len(part), generator=generator(seed, DRAW_STREAM, step))
    return part[u < sample_rate]


def partition_sample_rate(expected_batch_size: float, num_samples: int, bands: int) -> float:
    """q for an expected batch size, relative to the smallest partition (as jax-privacy's
    ``batch_size / (dataset_size // bands)``), so no partition exceeds the batch asked for."""
    q = expected_batch_size / (num_samples // bands)
    if not 0 < q <= 1:
        raise ValueError(f"expected batch {expected_batch_size} from partitions of "
                         f"{num_samples // bands}: need 0 < batch <= N // bands (fewer bands)")
    return q


def participations(steps: int, bands: int) -> int:
    """Most times one example can be sampled in ``steps`` steps: partition 0's count."""
    return math.ceil(steps / bands)


def charges(step: int, bands: int) -> bool:
    """Whether step ``step`` starts a new cycle, i.e. adds one DP-SGD step to the ledger
    (the ledger then holds ``participations(steps, bands)`` steps after ``steps`` steps)."""
    return step % bands == 0


def accounting_params(noise_multiplier: float, sample_rate: float, steps: int,
                      coefs: Sequence[float]) -> tuple[float, float, int]:
    """``(sigma_eff, q, k)`` to hand the DP-SGD accountant: sigma_eff = sigma / sens(C),
    the partition's sample rate q, and k = ceil(steps / b) participations."""
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier={noise_multiplier}: need > 0")
    return noise_multiplier / sensitivity(coefs, steps), float(sample_rate), \
        participations(steps, len(coefs))


def bandmf_epsilon(noise_multiplier: float, sample_rate: float, steps: int,
                   coefs: Sequence[float], delta: float, accountant: str = "prv") -> float:
    """(epsilon, delta) of ``steps`` BandMF steps with cyclic Poisson sampling."""
    return epsilon([accounting_params(noise_multiplier, sample_rate, steps, coefs)], delta,
                   accountant)


def calibrate_bandmf_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                           coefs: Sequence[float], accountant: str = "prv") -> float:
    """sigma (std of z per unit clipping norm) reaching ``target_epsilon`` in ``steps``."""
    k = participations(steps, len(coefs))
    return calibrate_sigma(target_epsilon, delta, sample_rate, k, accountant) \
        * sensitivity(coefs, steps)


class CyclicPoissonBatchSampler:
    """``sampling.PoissonBatchSampler``'s protocol (``global_batch``, ``indices``,
    ``__iter__`` over ``steps`` steps from ``first_step()``, rank r keeps every world-th
    index), drawing step t from partition ``(t + offset) mod bands``. ``split_seed`` fixes
    the partitions for the whole run (kept in checkpoints: a new split on resume would
    break the min-separation); ``seed`` the draws, fresh from the OS when None. ``offset``
    maps the trainer's step to the mechanism's: a second ``fit`` restarts the trainer's
    step at 0, the noise and the partition cycle do not."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, bands: int,
                 world: int = 1, rank: int = 0, seed: int | None = None, split_seed: int = 0,
                 first_step: Callable[[], int] | None = None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate} must lie in (0, 1]")
        self.parts = partitions(num_samples, bands, split_seed)
        self.n, self.q, self.steps, self.bands = num_samples, sample_rate, steps, bands
        self.world, self.rank, self.offset = world, rank, 0
        self.seed = fresh_seed() if seed is None else seed
        self.first_step = first_step or (lambda: 0)

    def set_epoch(self, epoch: int) -> None:  # draws key on the step, not the epoch
        pass

    def global_batch(self, step: int) -> torch.Tensor:
        part = self.parts[(step + self.offset) % self.bands]
        u = torch.rand(len(part), generator=generator(self.seed, DRAW_STREAM, step))
        return part[u < self.q]

    def indices(self, step: int) -> list[int]:
        """This rank's examples at ``step``."""
        return self.global_batch(step)[self.rank::self.world].tolist()

    def __iter__(self):
        t = self.first_step()
        for k in range(self.steps):
            yield self.indices(t + k)

    def __len__(self) -> int:
        return self.steps
