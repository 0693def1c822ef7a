"""Every use of a private Lightning attribute, in one place.

Lightning has no public hook for these two needs; each accessor fails loudly, naming the
Lightning version, when the attribute moves (``tests/test_lightning_internals.py`` runs them
against a real Trainer):

- wrapping the training DataLoader after the module/datamodule builds it and before the fit
  loop iterates it (DP-SGD swaps in a Poisson or shuffle-once loader there, so every way of
  supplying a loader is covered): ``trainer.fit_loop._data_source``;
- the number of training batches processed this epoch and in total (resumable samplers
  restart mid-epoch at that position): ``trainer.fit_loop.epoch_loop.batch_progress``.
"""
from __future__ import annotations

from typing import Any, Callable

import lightning as L


class LightningChanged(RuntimeError):
    """A private Lightning attribute this toolkit relies on is gone or changed shape."""


def _missing(what: str, err: Exception) -> LightningChanged:
    return LightningChanged(
        f"lightning {L.__version__} no longer has {what} ({err}); the toolkit was tested with "
        "lightning 2.6. Pin lightning<2.7 or update toolkit/lightning_internals.py")


def wrap_train_dataloader(trainer: L.Trainer, wrap: Callable[[Any], Any]) -> None:
    """Make the fit loop's training loader ``wrap(loader)`` each time Lightning (re)builds it
    (once per fit, and again when ``reload_dataloaders_every_n_epochs`` asks). Idempotent."""
    try:
        source = trainer.fit_loop._data_source
        make = source.dataloader
    except AttributeError as e:
        raise _missing("trainer.fit_loop._data_source.dataloader", e) from e
    if getattr(source, "_toolkit_wrapped", None) == wrap:
        return
    original = getattr(source, "_toolkit_original", make)
    source.dataloader = lambda: wrap(original())
    source._toolkit_original, source._toolkit_wrapped = original, wrap


def batches_processed(trainer: L.Trainer) -> tuple[int, int]:
    """(training batches processed this epoch, in total): a checkpoint written in
    ``on_train_batch_end`` holds ``completed = processed - 1``, and Lightning bumps ``processed``
    only after the loaders exist, so a resumed sampler skips exactly what was consumed."""
    try:
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return int(progress.current.processed), int(progress.total.processed)
    except AttributeError as e:
        raise _missing("trainer.fit_loop.epoch_loop.batch_progress", e) from e
