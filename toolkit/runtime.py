"""What a first run on a plain machine needs from its environment: known-harmless warnings
silenced (so the real ones are read) and a check that torch's threads fit the free cores."""
from __future__ import annotations

import logging
import os
import warnings

import torch


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_known_noise() -> None:
    """Silence what every run printed and no user can act on:

    - Lightning 2.6's ``isinstance(treespec, LeafSpec)`` deprecation under torch >= 2.9 (raised
      inside Lightning's own pytree helper, once per fit);
    - the "try installing litlogger" advertisement logged at every Trainer construction.
    """
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in log.filters):
        log.addFilter(_DropMessages("litlogger"))


def thread_warning(threads: int, cores: int, load: float) -> str | None:
    """A warning when ``threads`` torch threads exceed the cores left free by a 1-minute
    ``load`` average on ``cores`` cores, else None.

    Oversubscribed intra-op threads spin-wait on each other: on a loaded 2-core machine 60
    quickstart steps took 157 s with 2 threads and 21.5 s with 1. Threads are not changed
    automatically: results of some reductions depend on the thread count, and a resumed run
    must compute exactly as the run it continues."""
    free = max(1, int(cores - load + 0.5))
    if threads <= free:
        return None
    return (f"torch uses {threads} threads, but only ~{free} of the {cores} cores are free (1-minute "
            f"load average {load:.1f}): oversubscribed threads wait on each other and steps can run "
            f"several times slower. If the machine stays busy, start with OMP_NUM_THREADS={free} "
            "(keep the same value when resuming a run, so it computes identically).")


def check_threads() -> str | None:
    """:func:`thread_warning` for this process on CPU (None on a GPU machine)."""
    if torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return thread_warning(torch.get_num_threads(), cores or 1, os.getloadavg()[0])
