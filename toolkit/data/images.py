"""28x28 image classification data: MNIST-format IDX folders or a hub dataset."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..batch_keys import INPUT_KEYS, TARGET_KEYS, first_key
from .idx import GET_DATA, DataError, find_split, read_idx
from .samplers import resumable_loader


# normalization="public": fixed constants, not statistics of any data set (the familiar MNIST
# values 0.1307/0.3081 are the training set's own mean and std).
PUBLIC_MEAN_STD = (0.5, 0.5)


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices of ``size`` examples, as equal a share of each class as ``size`` allows."""
    classes = labels.unique()
    if size < len(classes):
        raise ValueError(f"train_subset={size} is smaller than the {len(classes)} classes")
    g = torch.Generator().manual_seed(seed)
    per, extra = divmod(size, len(classes))
    picked = []
    for i, c in enumerate(classes.tolist()):
        idx = (labels == c).nonzero().squeeze(1)
        want = per + (i < extra)
        if want > len(idx):
            raise ValueError(f"class {c} has only {len(idx)} examples, fewer than the {want} a "
                             f"balanced subset of {size} needs")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:want]])
    return torch.cat(picked).sort().values


def _load_hub(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import datasets
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:
        raise DataError(f"could not load hub dataset {name!r} ({type(e).__name__}: {e}). "
                        f"Give a local folder as data.root instead. {GET_DATA}") from e
    out = {}
    for split, key in (("train", "train"), ("t10k", "test")):
        d = ds[key].with_format("numpy")
        img_col = first_key(d.column_names, INPUT_KEYS)
        lab_col = first_key(d.column_names, TARGET_KEYS)
        if img_col is None or lab_col is None:
            raise DataError(f"hub dataset {name!r} has columns {d.column_names}: no image column "
                            f"(one of {INPUT_KEYS}) or label column (one of {TARGET_KEYS})")
        out[split] = (np.stack(d[img_col]).astype(np.uint8), np.asarray(d[lab_col]))
    return out


class ImageDataModule(L.LightningDataModule):
    """Images from ``root`` (IDX files; MNIST, Fashion-MNIST, KMNIST ...) or, when ``root``
    is absent, from hub dataset ``hub_name`` through ``datasets``.

    The last ``val_size`` training examples (after a fixed shuffle) validate; the official
    test split tests. ``train_subset`` keeps a class-balanced subset of the rest.
    Batches are ``(x, y)``: float images in [0, 1] normalized, int labels.

    ``normalization``: ``train`` (default) subtracts the training split's pixel mean and
    divides by its std, statistics of the training data; ``public`` uses the fixed constants
    :data:`PUBLIC_MEAN_STD` (maps [0, 1] to [-1, 1]), which depend on no example, as DP
    training needs (docs/dp.md, "Which preprocessing is private").
    """

    def __init__(self, root: str | None = None, hub_name: str | None = "ylecun/mnist",
                 batch_size: int = 128, eval_batch_size: int = 1000, val_size: int = 5000,
                 train_subset: int | None = None, seed: int = 0, num_workers: int = 0,
                 normalization: str = "train"):
        super().__init__()
        if normalization not in ("train", "public"):
            raise ValueError(f"normalization={normalization!r}: choose 'train' (the training "
                             "split's mean/std) or 'public' (fixed constants, for DP training)")
        self.save_hyperparameters()
        self._loaded = False

    def _read(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        root, hub = self.hparams.root, self.hparams.hub_name
        if root is not None and Path(root).is_dir():
            return {s: tuple(read_idx(p) for p in find_split(Path(root), s)) for s in ("train", "t10k")}
        if hub is not None:
            return _load_hub(hub)
        raise DataError(f"data folder {root} does not exist and no hub_name is set. {GET_DATA}")

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        hp = self.hparams
        arrays = self._read()
        (xtr, ytr), (xte, yte) = arrays["train"], arrays["t10k"]
        x = torch.from_numpy(np.array(xtr, dtype=np.float32)).unsqueeze(1) / 255
        y = torch.from_numpy(np.array(ytr, dtype=np.int64))
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(hp.seed))
        if not 0 <= hp.val_size < len(x):
            raise ValueError(f"val_size={hp.val_size} must be below the {len(x)} training examples")
        tr, va = perm[:len(x) - hp.val_size], perm[len(x) - hp.val_size:]
        if hp.train_subset is not None:
            tr = tr[balanced_subset(y[tr], hp.train_subset, hp.seed)]
        if hp.normalization == "public":
            self.mean, self.std = PUBLIC_MEAN_STD
        else:
            self.mean, self.std = x[tr].mean().item(), x[tr].std().item()
        norm = lambda t: (t - self.mean) / self.std
        self.num_classes = int(y.max()) + 1
        self.train_set = TensorDataset(norm(x[tr]), y[tr])
        self.val_set = TensorDataset(norm(x[va]), y[va])
        xt = torch.from_numpy(np.array(xte, dtype=np.float32)).unsqueeze(1) / 255
        self.test_set = TensorDataset(norm(xt), torch.from_numpy(np.array(yte, dtype=np.int64)))
        self._loaded = True

    def train_dataloader(self):
        hp = self.hparams
        return resumable_loader(self, self.train_set, hp.batch_size, hp.seed, hp.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.eval_batch_size,
                          num_workers=self.hparams.num_workers)

    def test_dataloader(self):
        return DataLoader(self.test_set, batch_size=self.hparams.eval_batch_size,
                          num_workers=self.hparams.num_workers)
