"""Low-overhead training monitors. Each is a package named after its method: pure functions
(``core.py``) plus a Lightning callback (``callback.py``) that measures on logging steps only
(hooks exist only then) and keeps its state in checkpoints. ``base.py`` (StepMonitor) and
``layers.py`` (finding blocks, branches and heads in any model) are what they share."""
from .emergence import EmergenceFit, emergence_law, fit_emergence, fit_history
from .layers import find_blocks, resolve_layers
from .massive import (ActivationStats, MassiveActivationMonitor, activation_stats,
                      massive_activations, read_history, write_history)
from .spectral import SpectralMonitor, power_iteration, spectral_scale
from .stability import (StabilityMonitor, attention_logits, outlier_share, softmax_z,
                        stability_indicators)

__all__ = ["ActivationStats", "EmergenceFit", "MassiveActivationMonitor", "SpectralMonitor",
           "StabilityMonitor", "activation_stats", "attention_logits", "emergence_law",
           "find_blocks", "fit_emergence", "fit_history", "massive_activations",
           "outlier_share", "power_iteration", "read_history", "resolve_layers", "softmax_z",
           "spectral_scale", "stability_indicators", "write_history"]
