import os

# One thread per library unless the caller chose (before numpy, scipy and torch load their
# pools; subprocesses inherit it): the tests' models and matrices are tiny, so a second thread
# mostly waits at barriers, and the machine is shared. On the 2-core machine the recipe tests
# took 2.1x the wall and CPU time with two.
_threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # torch takes MKL's too
    os.environ.setdefault(_var, _threads)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Data next to the checkout (as in CI); TOOLKIT_DATA overrides. A fresh clone without either
# fetches MNIST once into the user cache (FETCHED) where the hub can be reached.
DATA = Path(os.environ.get("TOOLKIT_DATA", ROOT.parent / "shared" / "data"))
MNIST = DATA / "mnist"
FETCHED = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "toolkit" / "mnist"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _has_mnist(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MNIST_FILES)


@pytest.fixture(scope="session")
def _real_mnist() -> tuple[Path | None, str]:
    """The real-MNIST folder, fetched from the hub (ylecun/mnist) once per session when no
    local copy exists; (None, why) when it cannot be had."""
    for folder in (MNIST, FETCHED):
        if _has_mnist(folder):
            return folder, ""
    try:
        from tests.helpers import write_idx
        from toolkit.data.images import _load_hub
        FETCHED.mkdir(parents=True, exist_ok=True)
        for split, (images, labels) in _load_hub("ylecun/mnist").items():
            write_idx(FETCHED / f"{split}-images-idx3-ubyte.gz", images)
            write_idx(FETCHED / f"{split}-labels-idx1-ubyte.gz", labels.astype("uint8"))
        return FETCHED, ""
    except Exception as e:  # offline: say exactly what to put where
        cause = e.__cause__ or e  # the hub's own error, not the loader's advice around it
        return None, f"{type(cause).__name__}: {str(cause)[:200]}"


@pytest.fixture
def mnist_root(_real_mnist, request) -> Path:
    folder, why = _real_mnist
    if folder is None:  # the test fails (not a setup error) with this, before its body runs
        request.node.missing_data = (
            f"this test needs real MNIST, which is not on this machine and could not be "
            f"fetched from the hub ({why}). Put the four files {', '.join(MNIST_FILES)} (from "
            f"any MNIST mirror) in {MNIST} (or in $TOOLKIT_DATA/mnist, or in {FETCHED}), then "
            f"rerun.")
        if getattr(request.node, "in_call", False):  # asked for inside the test body
            pytest.fail(request.node.missing_data, pytrace=False)
        return MNIST
    return folder


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    item.in_call = True
    if getattr(item, "missing_data", None):
        pytest.fail(item.missing_data, pytrace=False)


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
