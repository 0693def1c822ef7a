"""Tiny Shakespeare as a character LM whose examples have owners: every speaker is a user.

For user-level DP (``DPSGD(privacy_unit="user", user_key=2)``; docs/dp.md, "User-level
privacy"; Charles et al. 2024, arXiv 2407.07737). Each turn ("NAME:\\n<lines>\\n", the
pattern of :mod:`.speakers`) belongs to its speaker; every ``val_every``-th turn validates.
A speaker's training turns, in order, are concatenated and cut into disjoint windows of
``block_size + 1`` characters, each an example ``(x, y, user)``; a speaker with less than
one window of training text owns no example and is left out of the population (``users``).
The vocabulary is the fixed printable set (:data:`.text.PRINTABLE`), which depends on no
example.
"""
from __future__ import annotations

from collections import defaultdict

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .idx import DataError
from .samplers import resumable_loader
from .speakers import TURN
from .text import PRINTABLE, FixedBlocks, load_text


def encode(text: str) -> torch.Tensor:
    stoi = {c: i for i, c in enumerate(PRINTABLE)}
    return torch.tensor([stoi.get(c, len(PRINTABLE) - 1) for c in text], dtype=torch.long)


class SpeakerBlocks(Dataset):
    """Disjoint windows of each speaker's text: item i is ``(x, y, user)``, ``users`` the
    declared population (every user owns at least one window)."""

    def __init__(self, texts: dict[str, str], block_size: int):
        xs, owners, self.names = [], [], []
        for name in sorted(texts):
            ids = encode(texts[name])
            n = len(ids) // (block_size + 1)
            if n == 0:
                continue
            xs.append(ids[:n * (block_size + 1)].view(n, block_size + 1))
            owners += [len(self.names)] * n
            self.names.append(name)
        if not xs:
            raise DataError(f"no speaker has {block_size + 1} characters of training text")
        self.blocks, self.owner = torch.cat(xs), torch.tensor(owners)
        self.users = list(range(len(self.names)))

    def __len__(self):
        return len(self.owner)

    def __getitem__(self, i):
        b = self.blocks[i]
        return b[:-1], b[1:], self.owner[i]


class SpeakerTextDataModule(L.LightningDataModule):
    """Training items ``(x, y, user)`` (:class:`SpeakerBlocks`), validation ``(x, y)``
    windows of the held-out turns. ``batch_size`` is what the training loader asks for;
    under ``DPSGD(privacy_unit="user", user_sampling="uls")`` it counts users."""

    def __init__(self, block_size: int = 64, batch_size: int = 64, val_every: int = 10,
                 val_blocks: int = 256, path: str | None = None, seed: int = 0,
                 num_workers: int = 0):
        super().__init__()
        if val_every < 2:
            raise ValueError(f"val_every={val_every}: give >= 2 (every val_every-th turn validates)")
        self.save_hyperparameters()
        self._sets: tuple[SpeakerBlocks, FixedBlocks] | None = None

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _load(self) -> tuple[SpeakerBlocks, FixedBlocks]:
        if self._sets is not None:
            return self._sets
        hp = self.hparams
        turns = TURN.findall(load_text(hp.path))
        texts: defaultdict[str, str] = defaultdict(str)
        val = []
        for i, (name, body) in enumerate(turns):
            if i % hp.val_every == hp.val_every - 1:
                val.append(body)
            else:
                texts[name] += body
        self._sets = (SpeakerBlocks(dict(texts), hp.block_size),
                      FixedBlocks(encode("".join(val)), hp.block_size, hp.val_blocks))
        return self._sets

    @property
    def train_set(self) -> SpeakerBlocks:
        return self._load()[0]

    @property
    def vocab_size(self) -> int:
        return len(PRINTABLE)

    def train_dataloader(self):
        hp = self.hparams
        return resumable_loader(self, self.train_set, hp.batch_size, hp.seed, hp.num_workers)

    def val_dataloader(self):
        return DataLoader(self._load()[1], batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader
