"""Small builders shared by tests."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_fake_mnist(root: Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> Path:
    """Class-separable fake digits: class c lights up row band c, plus noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 7, 4:24] = 255
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return root


def write_tiny_lm_checkpoint(path: Path, vocab_size: int = 65, seed: int = 0) -> Path:
    """A 1-layer 16-wide ``LanguageModel`` checkpoint (random weights) in Lightning's format, for
    modules that start from a trained LM (``BitWidthSearch``)."""
    import lightning as L
    import torch

    from toolkit import LanguageModel
    torch.manual_seed(seed)
    lm = LanguageModel(vocab_size=vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=16)
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path
