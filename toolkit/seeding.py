"""One way to derive random streams: ``derive_seed(*parts)``.

Every stream that must resume exactly without saved generator state (data order per epoch or
step, mixing partners per batch, Langevin and DP noise per step, power-iteration start vectors)
is a generator seeded from its coordinates, e.g. ``(seed, rank, step)``. Hashing the parts
(BLAKE2b) keeps nearby coordinates' streams unrelated, which sums and products of small
integers do not guarantee.
"""
from __future__ import annotations

import hashlib
import os

import torch


def derive_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (seed, rank, step, ...)."""
    h = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def generator(*parts: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    g = torch.Generator(device=device) if device is not None else torch.Generator()
    return g.manual_seed(derive_seed(*parts))


def global_seed(seed: int | None) -> int:
    """``seed`` or, when None, the one ``seed_everything`` (the CLI's ``seed_everything``) set."""
    return int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
