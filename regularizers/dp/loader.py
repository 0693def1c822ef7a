"""The training loader a DP-SGD run may use, and what it tells the accountant.

``poisson``: the user's map-style dataset re-read in Poisson batches (:mod:`.sampling`),
q = expected batch / N. ``shuffle``: the user's loader kept, one full-data release per
pass (no amplification), which holds only if a pass shows each example at most once;
loaders that cannot promise that (iterable datasets, samplers with replacement or
weights, custom batch samplers, a DistributedSampler that pads by repeating examples)
are refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset,
                              RandomSampler, SequentialSampler)

from .errors import PrivacyError
from .sampling import PoissonBatchSampler, PoissonLoader


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


def private_loader(loader, sampling: str, world: int, rank: int, seed: int,
                   first_step: Callable[[], int]) -> PrivateData:
    why = why_not_once_per_pass(loader)
    if why is not None:
        fix = ("Give a map-style dataset in a plain DataLoader" if sampling == "poisson" else
               "Use the default sampling='poisson' with a map-style dataset, or a loader that "
               "shows each example once per pass")
        raise PrivacyError(f"cannot account for the training data under sampling="
                           f"{sampling!r}: {why}. {fix}")
    n, bs = len(loader.dataset), batch_size(loader)
    if sampling == "shuffle":
        return PrivateData(loader, n, 1.0, bs * world)
    expected = bs * world
    if expected > n:
        raise PrivacyError(f"expected batch {expected} (batch_size {bs} x {world} ranks) exceeds "
                           f"the {n} examples: lower the batch size")
    q = expected / n
    steps = max(1, round(n / expected))
    sampler = PoissonBatchSampler(n, q, steps, world, rank, seed, first_step=first_step)
    return PrivateData(PoissonLoader(loader.dataset, sampler, loader.collate_fn,
                                     loader.num_workers, loader.pin_memory), n, q, expected)
