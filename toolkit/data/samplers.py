"""Samplers whose order is a pure function of (seed, epoch, batch), so that DDP ranks
split one global batch and a mid-epoch resume continues with exactly the next batch."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..lightning_internals import batches_processed
from ..seeding import generator


class ResumableSampler(DistributedSampler):
    """Epoch permutation from ``derive_seed(seed, epoch)``; global batch g = perm[g*B*W:(g+1)*B*W],
    rank r takes rows [r*B, (r+1)*B) of it. With ``world=1, batch=2B`` and ``world=2,
    batch=B`` the global batches are identical.

    Subclassing ``DistributedSampler`` tells Lightning not to wrap it again.
    ``skip_batches`` drops the first batches of the first epoch iterated (resume).
    ``__len__`` stays the full epoch so Lightning's batch counting, which adds the
    batches already done, ends the epoch where it would have ended.
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, skip_batches: int = 0):
        self.n, self.batch_size, self.world, self.r = num_samples, batch_size, num_replicas, rank
        self.num_replicas, self.rank = num_replicas, rank
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0
        self.num_batches = num_samples // (batch_size * num_replicas)
        self.drop_last = True
        # A checkpoint taken after an epoch's last batch resumes at the next epoch's start.
        self.skip = skip_batches if skip_batches < self.num_batches else 0
        self.num_samples = self.num_batches * batch_size  # per rank, as in DistributedSampler
        if self.num_batches == 0:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of "
                             f"{batch_size} x {num_replicas} ranks; lower data.batch_size")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # Read the skip here, not inside the generator: Lightning may create an iterator it
        # never advances (a resume exactly at an epoch's end), and the skip must not leak
        # into the next epoch.
        skip, self.skip = self.skip, 0
        return self._indices(skip)

    def _indices(self, skip: int):
        if self.shuffle:
            g = generator(self.seed, self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        B, W = self.batch_size, self.world
        for b in range(skip, self.num_batches):
            start = b * B * W + self.r * B
            yield from perm[start:start + B].tolist()

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler`. Its position needs no saved state: the
    data module rebuilds the sampler from the trainer's restored batch count, so a mid-epoch
    resume is exact. ``state_dict``/``load_state_dict`` say so to Lightning, which otherwise
    warns on every mid-epoch resume that the loader "is not resumable"."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the position comes from the trainer's progress (see trainer_position)


def trainer_position(module) -> tuple[int, int, int, int]:
    """(world_size, global rank, batches done this epoch, batches done in total) of the
    module's trainer; zeros and world 1 when no trainer is attached.

    Counts ``processed`` batches (see :func:`toolkit.lightning_internals.batches_processed`).
    """
    trainer = getattr(module, "trainer", None)
    if trainer is None:
        return 1, 0, 0, 0
    in_epoch, total = batches_processed(trainer)
    return trainer.world_size, trainer.global_rank, in_epoch, total


def resumable_loader(module, dataset, batch_size: int, seed: int, num_workers: int = 0
                     ) -> ResumableLoader:
    """The training loader every toolkit data module builds: a shuffled, sharded, drop-last
    :class:`ResumableSampler` that skips the batches ``module``'s trainer already took this epoch."""
    world, rank, in_epoch, _ = trainer_position(module)
    sampler = ResumableSampler(len(dataset), batch_size, world, rank, seed, skip_batches=in_epoch)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                           num_workers=num_workers)
