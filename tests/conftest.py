import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Data next to the checkout (as in CI); TOOLKIT_DATA overrides.
DATA = Path(os.environ.get("TOOLKIT_DATA", ROOT.parent / "shared" / "data"))
MNIST = DATA / "mnist"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def mnist_root() -> Path:
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST files are missing from {MNIST}: the suite expects ../shared/data "
                    "beside the checkout, or TOOLKIT_DATA pointing at a folder with mnist/")
    return MNIST


@pytest.fixture
def tiny_mnist(tmp_path) -> Path:
    """A tiny MNIST-format folder (IDX .gz) written from random data: 600 train, 100 test."""
    from tests.helpers import write_fake_mnist
    return write_fake_mnist(tmp_path / "mnist", n_train=600, n_test=100)


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder, so runs/, reports and configs never land in the
    checkout."""
    monkeypatch.chdir(tmp_path)
