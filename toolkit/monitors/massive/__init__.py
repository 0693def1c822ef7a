"""Massive activations (Sun et al. 2024): the pure statistics and probe (core.py) and the monitor
callback that logs them and fits the emergence law at the end of fit (callback.py)."""
from .callback import MassiveActivationMonitor
from .core import (ABS_THRESHOLD, CSV_FIELDS, RATIO_THRESHOLD, ActivationStats, MassiveProbe,
                   activation_stats, massive_activations, read_history, write_history)

__all__ = ["ABS_THRESHOLD", "CSV_FIELDS", "RATIO_THRESHOLD", "ActivationStats", "MassiveActivationMonitor",
           "MassiveProbe", "activation_stats", "massive_activations", "read_history", "write_history"]
