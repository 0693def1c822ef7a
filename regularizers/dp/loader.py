"""The training loader a DP-SGD run may use, and what it tells the accountant.

``poisson``: the user's map-style dataset re-read in Poisson batches (:mod:`.sampling`),
q = expected batch / N, add/remove adjacency. ``shuffle``: the user's map-style dataset
re-read in fixed-size batches of a fresh secret permutation per pass
(:class:`.sampling.ShuffleBatchSampler`), one full-data release per pass (no amplification)
under zero-out adjacency (docs/dp.md, "Shuffling"). Either way loaders whose examples
cannot be counted (iterable datasets, samplers with replacement or weights, custom batch
samplers, a DistributedSampler that pads by repeating examples) are refused, and for
``shuffle`` also loaders that ask for a fixed order (``shuffle=False``): DP-SGD would
silently replace that order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset,
                              RandomSampler, SequentialSampler)

from .errors import PrivacyError
from .sampling import PoissonBatchSampler, PoissonLoader, ShuffleBatchSampler


@dataclass
class PrivateData:
    loader: object
    num_samples: int
    sample_rate: float          # q; 1 for shuffle (no amplification claimed)
    expected_batch_size: float  # the normalization q N (global, all ranks)


def batch_size(loader: DataLoader) -> int | None:
    if loader.batch_size is not None:
        return loader.batch_size
    return getattr(loader.batch_sampler, "batch_size", None)


def why_not_once_per_pass(loader) -> str | None:
    """None if a pass of ``loader`` shows each example of a known-size dataset at most once."""
    if not isinstance(loader, DataLoader):
        return f"the training loader is a {type(loader).__name__}, not a torch DataLoader"
    ds = loader.dataset
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return ("its dataset is iterable: the examples a pass shows (an iterator that cycles "
                "shows some several times) cannot be counted")
    if batch_size(loader) is None or not isinstance(loader.batch_sampler, BatchSampler):
        return (f"its batch sampler {type(loader.batch_sampler).__name__} is not torch's "
                "BatchSampler with a batch size (a custom one may repeat or select examples)")
    sampler = loader.batch_sampler.sampler
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != len(ds)):
        return "its RandomSampler draws with replacement or a subset"
    if isinstance(sampler, DistributedSampler) and not sampler.drop_last \
            and len(ds) % sampler.num_replicas:
        return (f"its DistributedSampler pads {len(ds)} examples to a multiple of "
                f"{sampler.num_replicas} ranks by repeating some of them")
    if not isinstance(sampler, (SequentialSampler, RandomSampler, DistributedSampler)):
        return (f"its sampler {type(sampler).__name__} may repeat, select or weight examples "
                "(put a subset into the dataset itself, e.g. torch.utils.data.Subset)")
    return None


def why_not_shuffled(loader: DataLoader) -> str | None:
    """None if ``loader`` asks for a random order (``shuffle=True``), which DP-SGD then draws
    itself from a secret seed; a reason if it asks for a fixed one."""
    sampler = loader.batch_sampler.sampler
    if isinstance(sampler, SequentialSampler) or (isinstance(sampler, DistributedSampler)
                                                  and not sampler.shuffle):
        return (f"its {type(sampler).__name__} asks for a fixed order (shuffle=False), which "
                "the secret permutation would silently replace")
    return None


def private_loader(loader, sampling: str, world: int, rank: int, seed: int,
                   first_step: Callable[[], int], users=None) -> PrivateData:
    """``users`` (a :class:`.user_unit.UserLevel`): user-level DP, whose units the Poisson
    sampler draws (users, or capped examples) and whose N is the number of users."""
    why = why_not_once_per_pass(loader)
    if why is not None:
        fix = ("Give a map-style dataset in a plain DataLoader" if sampling == "poisson" else
               "Use the default sampling='poisson' with a map-style dataset, or a loader that "
               "shows each example once per pass")
        raise PrivacyError(f"cannot account for the training data under sampling="
                           f"{sampling!r}: {why}. {fix}")
    n, bs = len(loader.dataset), batch_size(loader)
    if sampling == "shuffle":
        why = why_not_shuffled(loader)
        if why is not None:
            raise PrivacyError(f"sampling='shuffle' draws a secret random order, but {why}. "
                               "Pass shuffle=True (DP-SGD replaces its order by one from its "
                               "own secret seed), or use the default sampling='poisson'")
        sampler = ShuffleBatchSampler(n, bs, world, rank, seed, first_step=first_step)
        return PrivateData(PoissonLoader(loader.dataset, sampler, loader.collate_fn,
                                         loader.num_workers, loader.pin_memory), n, 1.0, bs * world)
    dataset = users.dataset(loader.dataset) if users else loader.dataset
    n = users.num_units() if users else n
    expected = bs * world
    if expected > n:
        raise PrivacyError(f"expected batch {expected} (batch_size {bs} x {world} ranks) exceeds "
                           f"the {n} {users.unit_name if users else 'examples'}: lower the batch size")
    q = expected / n
    steps = max(1, round(n / expected))
    sampler = PoissonBatchSampler(n, q, steps, world, rank, seed, first_step=first_step)
    if users:
        sampler, n = users.wrap(sampler), len(users.users)
    return PrivateData(PoissonLoader(dataset, sampler, loader.collate_fn,
                                     loader.num_workers, loader.pin_memory), n, q, expected)
