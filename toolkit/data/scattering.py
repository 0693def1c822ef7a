"""Images replaced by their wavelet-scattering features (Bruna & Mallat 2013; Oyallon &
Mallat 2015), the hand-crafted front end Tramer & Boneh 2021 ("Differentially Private
Learning Needs Better Features") train DP linear models on.

The transform is fixed (no learned or data-derived parameter), applied to each image on
its own, so computing it costs no privacy. Scattering2D(J=2, L=8) on 28x28 gives
81 x 7 x 7 features. Computed once in chunks and cached (kymatio's 2-d torch front end;
imported directly because ``kymatio.torch`` pulls a 3-d module broken by SciPy >= 1.15).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from .images import ImageDataModule


def scatter(x: torch.Tensor, J: int = 2, chunk: int = 2000) -> torch.Tensor:
    """(N, 1, H, W) images -> (N, 81, H/4, W/4) scattering coefficients (J=2, L=8)."""
    try:
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as e:
        raise ImportError("ScatterImageDataModule needs kymatio: pip install kymatio") from e
    S = ScatteringTorch2D(J=J, shape=tuple(x.shape[-2:]))
    out = [S(x[i:i + chunk]).flatten(1, 2) for i in range(0, len(x), chunk)]
    return torch.cat(out)


class ScatterImageDataModule(ImageDataModule):
    """:class:`ImageDataModule` whose batches are ``(scattering features, label)``;
    features are cached under ``cache_dir`` (keyed by data folder, split and J)."""

    def __init__(self, root: str | None = None, hub_name: str | None = "ylecun/mnist",
                 batch_size: int = 128, eval_batch_size: int = 1000, val_size: int = 5000,
                 train_subset: int | None = None, seed: int = 0, num_workers: int = 0,
                 J: int = 2, cache_dir: str | None = "runs/.cache", normalization: str = "train"):
        super().__init__(root, hub_name, batch_size, eval_batch_size, val_size, train_subset,
                         seed, num_workers, normalization)
        self.save_hyperparameters()

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        super().setup(stage)
        hp = self.hparams
        parts = (str(Path(hp.root).resolve()) if hp.root else hp.hub_name,
                 hp.val_size, hp.train_subset, hp.seed, hp.J)
        if hp.normalization != "train":  # the default keeps the keys of existing caches
            parts += (hp.normalization,)
        key = hashlib.sha1(repr(parts).encode()).hexdigest()[:12]
        cache = Path(hp.cache_dir) / f"scatter_{key}.pt" if hp.cache_dir else None
        sets = (self.train_set, self.val_set, self.test_set)
        if cache is not None and cache.is_file():
            feats = torch.load(cache)
        else:
            feats = [scatter(s.tensors[0], hp.J) for s in sets]
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch.save(feats, cache)
        self.train_set, self.val_set, self.test_set = (
            TensorDataset(f, s.tensors[1]) for f, s in zip(feats, sets))
        self.feature_shape = tuple(feats[0].shape[1:])
