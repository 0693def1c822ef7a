"""Old import path of :class:`regularizers.step_control.LRSpike`."""
from .step_control.lr_spike import LRSpike

__all__ = ["LRSpike"]
