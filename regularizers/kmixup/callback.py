"""Lightning callbacks that mix training batches with k-mixup or mixup (the pure core: core.py).

They work on any LightningModule, including one written without them: at fit start they
register with the module's one batch-transform wrapper (batch_transforms.py), so
``training_step`` receives the mixed batch, and at fit end (or on an exception) the module
is restored exactly. Validation, test and predict steps never see a mixed batch. Two mixing
callbacks in one Trainer are refused at fit start. The module's loss must accept soft targets (N x C probability rows):
``F.cross_entropy(logits, target)`` does, and so does the toolkit's ``Classifier``.
"""
from __future__ import annotations

from typing import Any

import torch

from toolkit.batch_keys import INPUT_KEYS, TARGET_KEYS, input_target_keys
from toolkit.seeding import generator, global_seed

from ..batch_transforms import BatchTransform
from .core import kmixup_batch

X_KEYS, Y_KEYS = INPUT_KEYS, TARGET_KEYS  # old names of the shared lists


class KMixup(BatchTransform):
    """k-mixup (Greenewald et al., "k-Mixup Regularization for Deep Learning via Optimal
    Transport") of every training batch; :func:`regularizers.kmixup_batch` does the work.

    Args:
        k: block size matched by optimal transport; at most half the per-device batch (each
            k-block is matched against another, disjoint k-block of the same batch). A batch
            not divisible by k: the leftover n mod k examples form a smaller block (see
            :func:`regularizers.kmixup.kmixup_partners`).
        alpha: lambda ~ Beta(alpha, alpha), one lambda per batch.
        num_classes: needed for integer targets; else taken from ``pl_module.hparams``,
            ``pl_module.num_classes`` or the datamodule's ``num_classes``.
        cost: "sqeuclidean" (W2, the paper) or "euclidean" (the authors' code).
        feature_layer: dotted name of a submodule of the LightningModule (e.g.
            "model.fc"); its activations, from an extra no-grad forward in eval mode, are
            the matching space (manifold k-mixup). None matches in input space.
        seed: mixing seed; None uses the ``seed_everything`` seed. Each DDP rank mixes its own
            batch with its own stream (seed, rank, batch counter); the counter is in
            ``state_dict`` so a resumed run mixes exactly as the uninterrupted one.
        input_key / target_key: dict batches; default: the first of the usual names.
    """

    # DP-SGD refuses callbacks that mix examples; so does a second mixing callback
    mixes_batch = True

    def __init__(self, k: int = 16, alpha: float = 1.0, num_classes: int | None = None,
                 cost: str = "sqeuclidean", feature_layer: str | None = None,
                 seed: int | None = None, solver: str = "lsa", input_key: str | None = None,
                 target_key: str | None = None):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be a positive integer")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0")
        self.k, self.alpha, self.num_classes, self.cost = k, alpha, num_classes, cost
        self.feature_layer, self.seed, self.solver = feature_layer, seed, solver
        self.input_key, self.target_key = input_key, target_key
        self.batches_mixed = 0

    # ---- wiring -------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._rank, self._seed = trainer.global_rank, global_seed(self.seed)
        self._classes = self._find_num_classes(trainer, pl_module)
        self._checked = False  # target values are checked on a fit's first batch (host syncs)
        super().on_fit_start(trainer, pl_module)

    def transform_batch(self, batch, pl_module):
        return self.mix_batch(batch, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"batches_mixed": self.batches_mixed, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_mixed = state_dict["batches_mixed"]

    # ---- mixing -------------------------------------------------------------------------
    def _find_num_classes(self, trainer, pl_module) -> int | None:
        if self.num_classes is not None:
            return self.num_classes
        for src in (getattr(pl_module, "hparams", {}), vars(pl_module), vars(trainer.datamodule)
                    if trainer.datamodule is not None else {}):
            n = src.get("num_classes") if hasattr(src, "get") else None
            if isinstance(n, int):
                return n
        return None

    def _features(self, pl_module):
        if self.feature_layer is None:
            return None
        layer = pl_module.get_submodule(self.feature_layer)

        def features(x):
            out = []
            handle = layer.register_forward_hook(lambda m, i, o: out.append(o))
            was_training = pl_module.training
            try:  # eval mode: the extra forward must not move batch-norm running statistics
                pl_module.eval()
                pl_module(x)
            finally:
                handle.remove()
                pl_module.train(was_training)
            return out[0]

        return features

    def _split(self, batch):
        if isinstance(batch, dict):
            xk, yk = input_target_keys(batch, f"{type(self).__name__} (or pass input_key= and "
                                       "target_key=)", self.input_key, self.target_key)
            return batch[xk], batch[yk], lambda x, y: {**batch, xk: x, yk: y}
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            rest = list(batch[2:])
            return batch[0], batch[1], lambda x, y: type(batch)([x, y, *rest]) \
                if not hasattr(batch, "_fields") else type(batch)(x, y, *rest)
        raise TypeError(f"{type(self).__name__} mixes batches that are an (x, y, ...) tuple/list "
                        f"or a dict; got {type(batch).__name__}")

    def generator(self) -> torch.Generator:
        """The generator of the next batch: a pure function of (seed, global rank, batches
        mixed). A CPU generator on every device, deliberately: lambda goes through scipy's
        ``betaincinv`` and the OT matching through scipy on the host anyway, and the stream is
        then the same on CPU and GPU; the permutation (n integers) is copied to the device."""
        return generator(self._seed, self._rank, self.batches_mixed)

    def mix_batch(self, batch, pl_module=None):
        x, y, rebuild = self._split(batch)
        n = x.shape[0]
        if self.k > n // 2:
            raise ValueError(f"{type(self).__name__}: k={self.k} is too large for this batch of "
                             f"{n}: each k-block is matched against another disjoint k-block, so "
                             f"k <= {n // 2}. Lower k or raise the batch size (and use drop_last=True "
                             "if this is an epoch's short last batch).")
        if self._classes is None and not y.is_floating_point():
            raise ValueError(f"{type(self).__name__} cannot tell the number of classes for integer "
                             f"targets: pass {type(self).__name__}(num_classes=...) or give the "
                             "module or datamodule a num_classes attribute/hparam")
        feats = self._features(pl_module) if pl_module is not None else None
        xm, ym = kmixup_batch(x, y, self.k, self.alpha, self._classes, self.generator(),
                              self.cost, feats, self.solver,
                              check_values=not getattr(self, "_checked", False))
        self._checked = True
        self.batches_mixed += 1
        return rebuild(xm, ym)


class Mixup(KMixup):
    """Mixup (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization"): k-mixup with
    k = 1; each example is mixed with a random other example of its batch."""

    def __init__(self, alpha: float = 1.0, num_classes: int | None = None, seed: int | None = None,
                 input_key: str | None = None, target_key: str | None = None):
        super().__init__(1, alpha, num_classes, seed=seed, input_key=input_key,
                         target_key=target_key)
