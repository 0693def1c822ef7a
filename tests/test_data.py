import gzip

import numpy as np
import pytest
import torch

from toolkit.data import (DataError, ImageDataModule, ResumableSampler, TextDataModule,
                          balanced_subset, read_idx)
from toolkit.data.text import BlockStream

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_idx_parsing_of_real_mnist(mnist_root):
    images = read_idx(mnist_root / "train-images-idx3-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    labels = read_idx(mnist_root / "train-labels-idx1-ubyte.gz")
    assert np.bincount(labels).tolist() == MNIST_TRAIN_COUNTS
    test_labels = read_idx(mnist_root / "t10k-labels-idx1-ubyte.gz")
    assert np.bincount(test_labels).tolist() == MNIST_TEST_COUNTS
    assert read_idx(mnist_root / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)


def test_truncated_gzip_names_path_and_fix(mnist_root, tmp_path):
    src = (mnist_root / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match=rf"{bad.name}.*(corrupt|truncated).*download"):
        read_idx(bad)


def test_truncated_payload_and_bad_magic(tmp_path):
    p = tmp_path / "x-idx1-ubyte.gz"
    with gzip.open(p, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(50))
    with pytest.raises(DataError, match="header says"):
        read_idx(p)
    with gzip.open(p, "wb") as f:
        f.write(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(p)


def test_missing_folder_explains_how_to_get_data(tmp_path):
    dm = ImageDataModule(root=str(tmp_path / "absent"), hub_name=None)
    with pytest.raises(DataError, match="does not exist.*Download"):
        dm.setup()
    dm = ImageDataModule(root=str(tmp_path), hub_name=None)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        dm.setup()


def test_image_module_splits_and_balanced_subset(tiny_mnist):
    dm = ImageDataModule(root=str(tiny_mnist), val_size=100, train_subset=200, batch_size=20)
    dm.setup()
    assert len(dm.train_set) == 200 and len(dm.val_set) == 100 and len(dm.test_set) == 100
    assert torch.bincount(dm.train_set.tensors[1]).tolist() == [20] * 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (20, 1, 28, 28) and y.dtype == torch.long
    assert abs(dm.train_set.tensors[0].mean().item()) < 1e-4  # normalized by train stats


def test_balanced_subset_rejects_impossible_sizes():
    labels = torch.tensor([0] * 5 + [1] * 50)
    with pytest.raises(ValueError, match="class 0 has only 5"):
        balanced_subset(labels, 20, 0)


def test_resumable_sampler_splits_global_batches_and_skips():
    one = list(ResumableSampler(100, 8, 1, 0, seed=3))
    r0 = list(ResumableSampler(100, 4, 2, 0, seed=3))
    r1 = list(ResumableSampler(100, 4, 2, 1, seed=3))
    for b in range(len(r0) // 4):
        assert sorted(one[8 * b: 8 * b + 8]) == sorted(r0[4 * b: 4 * b + 4] + r1[4 * b: 4 * b + 4])
    skipped = ResumableSampler(100, 8, 1, 0, seed=3, skip_batches=5)
    assert list(skipped) == one[40:] and len(skipped) == len(one)
    assert list(skipped) == one  # the skip applies to the first pass only
    # a resume after an epoch's last batch starts the next epoch whole
    assert list(ResumableSampler(100, 8, 1, 0, seed=3, skip_batches=12)) == one


def test_text_module_vocab_and_deterministic_stream():
    dm = TextDataModule(block_size=16, batch_size=4)
    assert dm.vocab_size == 65
    assert dm.decode(dm.encode("First Citizen")) == "First Citizen"
    s = BlockStream(dm.train_data, 16, 4, seed=0)
    (x0, y0), (x1, _) = s.batch(0), s.batch(1)
    assert torch.equal(x0[:, 1:], y0[:, :-1]) and not torch.equal(x0, x1)
    assert torch.equal(BlockStream(dm.train_data, 16, 4, seed=0).batch(0)[0], x0)
    both = [BlockStream(dm.train_data, 16, 2, 0, world=2, rank=r).batch(0)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(both), x0)  # ranks split one global batch
    resumed = next(iter(BlockStream(dm.train_data, 16, 4, 0, start_step=1)))[0]
    assert torch.equal(resumed, x1)


def test_text_module_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        TextDataModule(path=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="train_fraction"):
        TextDataModule(train_fraction=1.5)
