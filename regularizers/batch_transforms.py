"""One wrapper of ``training_step`` per module, shared by every batch-transforming callback.

A callback cannot hand Lightning a different training batch, so callbacks that change the
batch (mixup, k-mixup ...) must wrap the module's ``training_step``. When each callback
wrapped and restored it on its own, two of them unwound in the wrong order and the second
restore crashed (or left a wrapper behind). Here the first registration installs a single
wrapper that runs the registered transforms in callback order, and the last one to leave
puts back exactly what the module's ``__dict__`` held before (usually nothing, so the
class's method shows through again).

Two callbacks that both *mix examples* (``mixes_batch = True``) are refused at fit start:
mixing an already mixed batch is neither method, and the recipe would report something it
did not run.
"""
from __future__ import annotations

import weakref
from typing import Any

import lightning as L

_MISSING = object()
# module -> (transforms in call order, what vars(module)["training_step"] was before).
# Kept outside the module so that nothing but training_step is ever added to it.
_CHAINS: "weakref.WeakKeyDictionary[L.LightningModule, tuple[list, Any]]" = \
    weakref.WeakKeyDictionary()


def register(module: L.LightningModule, transform: "BatchTransform") -> None:
    """Make ``transform.transform_batch(batch, module)`` run before ``module.training_step``."""
    if module not in _CHAINS:
        previous = vars(module).get("training_step", _MISSING)
        original = module.training_step  # bound method, or the instance attribute above
        chain: list = []

        def training_step(batch, *args, **kwargs):
            for t in list(chain):
                batch = t.transform_batch(batch, module)
            return original(batch, *args, **kwargs)

        training_step.__wrapped__ = original
        module.training_step = training_step
        _CHAINS[module] = (chain, previous)
    chain = _CHAINS[module][0]
    if transform not in chain:
        chain.append(transform)


def unregister(module: L.LightningModule, transform: "BatchTransform") -> None:
    """Remove ``transform``; the last one out restores the module's ``training_step``."""
    if module not in _CHAINS:
        return
    chain, previous = _CHAINS[module]
    if transform in chain:
        chain.remove(transform)
    if not chain:
        del _CHAINS[module]
        if previous is _MISSING:
            vars(module).pop("training_step", None)
        else:
            module.training_step = previous


def transforms_of(module: L.LightningModule) -> list:
    """The transforms now registered on ``module`` (empty outside fit)."""
    return list(_CHAINS[module][0]) if module in _CHAINS else []


def check_compatible(callbacks) -> None:
    """Refuse two example-mixing callbacks in one Trainer, naming both and the fix."""
    mixers = [type(cb).__name__ for cb in callbacks if getattr(cb, "mixes_batch", False)]
    if len(mixers) > 1:
        raise ValueError(f"callbacks {mixers} both mix examples across the training batch; "
                         "mixing an already mixed batch is neither method. Keep one of them "
                         "in trainer.callbacks.")


class BatchTransform(L.Callback):
    """Base of callbacks that transform every training batch: subclasses define
    ``transform_batch(batch, pl_module) -> batch``. Validation, test and predict batches are
    never transformed. The module is left exactly as it was after fit, and after an
    exception (Lightning calls ``on_exception`` on every callback)."""

    mixes_batch = False  # True: mixes examples (DP-SGD refuses it; only one per Trainer)

    def transform_batch(self, batch: Any, pl_module: L.LightningModule) -> Any:
        raise NotImplementedError

    def on_fit_start(self, trainer, pl_module) -> None:
        check_compatible(trainer.callbacks)
        self._module = pl_module
        register(pl_module, self)

    def _release(self) -> None:
        module = getattr(self, "_module", None)
        if module is not None:
            unregister(module, self)
            self._module = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._release()
