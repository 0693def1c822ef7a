"""The shipped DP recipes preprocess with public constants only: their vocabulary and their
normalization do not change when a training example changes (docs/dp.md, "Which
preprocessing is private"). Each check also runs the non-DP default, which does change, so
the test sees the difference it guards."""
import importlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import write_fake_mnist, write_idx
from toolkit.data.idx import read_idx
from toolkit.data.text import EMBEDDED

ROOT = Path(__file__).resolve().parent.parent


def recipe_data(name: str, **override):
    node = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())["data"]
    module, cls = node["class_path"].rsplit(".", 1)
    kw = {**node.get("init_args", {}), **override}
    return getattr(importlib.import_module(module), cls)(**kw)


def test_dp_lm_vocabulary_does_not_depend_on_the_training_text(tmp_path):
    text = EMBEDDED.read_text(encoding="utf-8")
    assert text.count("$") == 1
    block = 65  # the recipe's privacy unit: one disjoint window of block_size + 1 characters
    i = text.index("$") // block * block
    without = text[:i] + text[i + block:]
    (tmp_path / "full.txt").write_text(text, encoding="utf-8")
    (tmp_path / "without.txt").write_text(without, encoding="utf-8")
    full = recipe_data("dp_lm", path=str(tmp_path / "full.txt"))
    cut = recipe_data("dp_lm", path=str(tmp_path / "without.txt"))
    assert full.vocab_size == cut.vocab_size == 97
    assert torch.equal(full.encode(without), cut.encode(without))
    assert torch.equal(cut.train_data, full.encode(without)[:len(cut.train_data)])
    assert full.decode(full.encode("a$\u00e9")) == "a$\ufffd"  # outside: the fixed unknown
    # the non-private default (the corpus's characters) does depend on that one block
    a = recipe_data("dp_lm", path=str(tmp_path / "full.txt"), vocab="corpus")
    b = recipe_data("dp_lm", path=str(tmp_path / "without.txt"), vocab="corpus")
    assert a.vocab_size == b.vocab_size + 1
    assert (a.encode(without) != b.encode(without)).sum() > 0


def test_dpsgd_mnist_normalization_does_not_depend_on_the_training_images(tmp_path):
    root = write_fake_mnist(tmp_path / "a", n_train=120, n_test=20)
    other = tmp_path / "b"
    shutil.copytree(root, other)
    images = read_idx(next(other.glob("train-images*")))
    write_idx(next(other.glob("train-images*")), np.minimum(images.astype(np.int64) * 3, 255)
              .astype(np.uint8))
    kw = {"val_size": 20, "cache_dir": None}
    dms = [recipe_data("dpsgd_mnist", root=str(r), **kw) for r in (root, other)]
    for dm in dms:
        dm.setup()
    assert (dms[0].mean, dms[0].std) == (dms[1].mean, dms[1].std) == (0.5, 0.5)
    assert not torch.equal(dms[0].train_set.tensors[0], dms[1].train_set.tensors[0])
    assert torch.equal(dms[0].test_set.tensors[0], dms[1].test_set.tensors[0])
    # the non-private default (training mean/std) does move with the training images
    from toolkit import ImageDataModule
    plain = [ImageDataModule(root=str(r), val_size=20, normalization="train") for r in (root, other)]
    for dm in plain:
        dm.setup()
    assert abs(plain[0].mean - plain[1].mean) > 0.05
    assert not torch.equal(plain[0].test_set.tensors[0], plain[1].test_set.tensors[0])


def test_preprocessing_options_are_checked_at_construction():
    from toolkit import ImageDataModule
    from toolkit.data.text import TextDataModule
    with pytest.raises(ValueError, match="normalization='mean'.*'public'"):
        ImageDataModule(normalization="mean")
    with pytest.raises(ValueError, match="vocab='ascii'.*'printable'"):
        TextDataModule(vocab="ascii")
    with pytest.raises(ValueError, match="give one of the two"):
        TextDataModule(vocab="printable", tokenizer="gpt2")
