"""Poisson subsampling: every step includes each example independently with probability q.

This is the sampling the subsampled-Gaussian accountants assume (Mironov, Talwar & Zhang
2019; Opacus's ``UniformWithReplacementSampler``), so batch sizes vary, empty included.
Draws depend on (seed, global step) only: DDP ranks draw the same global batch and each
takes every world-th index, and a resumed run never repeats an earlier step's draw.
"""
from __future__ import annotations

import secrets
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from toolkit.seeding import generator


def step_generator(seed: int, step: int, stream: int = 0,
                   device: torch.device | str | None = None) -> torch.Generator:
    """A generator for one (seed, step, stream): independent draws per step, on ``device``
    (the noise is drawn where the gradients live; CPU and CUDA draws differ, both exact
    Gaussians)."""
    return generator(seed, stream, step, device=device)


def fresh_seed() -> int:
    """A seed from the OS entropy pool: unknown to anyone, so the sampling stays secret."""
    return secrets.randbits(62)


class PoissonBatchSampler:
    """Yields ``steps`` lists of indices per epoch; step t's global batch is
    ``{i : U_i(seed, t) < q}`` and rank r keeps its r-th world-th share.

    ``first_step`` gives the global step the next iteration starts at (the trainer's
    ``global_step``), so the draws continue across epochs and resumes.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, world: int = 1,
                 rank: int = 0, seed: int | None = None,
                 first_step: Callable[[], int] | None = None):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate} must lie in (0, 1]")
        self.n, self.q, self.steps, self.world, self.rank = num_samples, sample_rate, steps, world, rank
        self.seed = fresh_seed() if seed is None else seed
        self.first_step = first_step or (lambda: 0)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it; draws key on the step
        pass

    def global_batch(self, step: int) -> torch.Tensor:
        u = torch.rand(self.n, generator=step_generator(self.seed, step))
        return (u < self.q).nonzero().squeeze(1)

    def __iter__(self):
        t = self.first_step()
        for k in range(self.steps):
            yield self.indices(t + k)

    def indices(self, step: int) -> list[int]:
        """This rank's examples at ``step``."""
        return self.global_batch(step)[self.rank::self.world].tolist()

    def __len__(self) -> int:
        return self.steps


class ShuffleBatchSampler:
    """``sampling="shuffle"``: each pass is a fresh uniformly random permutation cut into
    fixed-size global batches (the last incomplete one dropped), rank r taking rows
    [r*B, (r+1)*B) of each; every example appears at most once per pass.

    The permutation is drawn from (seed, global step at the start of the pass), so it is as
    secret as the seed (DPSGD's fresh entropy by default) and not the data module's public
    seed, and a new pass, fit or resume never reuses one.
    """

    def __init__(self, num_samples: int, batch_size: int, world: int = 1, rank: int = 0,
                 seed: int | None = None, first_step: Callable[[], int] | None = None):
        self.n, self.batch_size, self.world, self.rank = num_samples, batch_size, world, rank
        self.steps = num_samples // (batch_size * world)
        if self.steps == 0:
            raise ValueError(f"{num_samples} examples cannot fill one global batch of "
                             f"{batch_size} x {world} ranks; lower the batch size")
        self.seed = fresh_seed() if seed is None else seed
        self.first_step = first_step or (lambda: 0)

    def set_epoch(self, epoch: int) -> None:  # the pass keys on its first step
        pass

    def permutation(self, step: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=step_generator(self.seed, step, stream=2))

    def __iter__(self):
        self._start = self.first_step()
        self._perm = self.permutation(self._start)
        for b in range(self.steps):
            yield self.indices(self._start + b)

    def indices(self, step: int) -> list[int]:
        """This rank's examples at ``step`` of the pass being iterated."""
        start = (step - self._start) * self.batch_size * self.world + self.rank * self.batch_size
        return self._perm[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return self.steps


def map_tensors(batch, fn: Callable):
    """``batch`` with ``fn`` applied to every tensor in its lists, tuples and dicts."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    return batch


def _empty_like_batch(dataset: Dataset, collate: Callable) -> object:
    """A zero-row batch with the structure of a real one (for empty Poisson draws)."""
    return map_tensors(collate([dataset[0]]), lambda t: t[:0])


class PoissonLoader:
    """The training loader DP-SGD uses: a map-style dataset read in Poisson batches (or,
    with a :class:`ShuffleBatchSampler`, in the batches of a secret permutation).

    Not a ``DataLoader`` on purpose: Lightning would otherwise inject its own
    (fixed-size, shuffling) distributed sampler. ``TensorDataset`` batches are sliced
    directly; other datasets go through a ``DataLoader`` with the original collate.
    """

    def __init__(self, dataset: Dataset, batch_sampler: PoissonBatchSampler,
                 collate_fn: Callable | None = None, num_workers: int = 0,
                 pin_memory: bool = False):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.collate_fn = collate_fn or default_collate
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._empty = _empty_like_batch(dataset, self.collate_fn)

    def _collate(self, items):
        return self.collate_fn(items) if items else self._empty

    def __iter__(self):
        if (isinstance(self.dataset, TensorDataset) and self.num_workers == 0
                and self.collate_fn is default_collate):  # slicing == default collation
            for idx in self.batch_sampler:
                idx = torch.as_tensor(idx, dtype=torch.long)
                yield tuple(t[idx] for t in self.dataset.tensors)
            return
        yield from DataLoader(self.dataset, batch_sampler=self.batch_sampler,
                              collate_fn=self._collate, num_workers=self.num_workers,
                              pin_memory=self.pin_memory)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    # Stateless by design (each step is a fresh draw); declaring it lets Lightning resume
    # mid-epoch without its "loader is not resumable" warning.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
