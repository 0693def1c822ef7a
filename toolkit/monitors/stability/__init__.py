"""HyperP's stability indicators (attention and logit z, branch RMS, outlier share): the pure
indicators and probe (core.py, attention logits of many architectures in attention.py) and the
monitor callback (callback.py)."""
from .attention import attention_logits
from .callback import StabilityMonitor
from .core import (OUTLIER_K, StabilityProbe, outlier_share, rms, softmax_z,
                   stability_indicators)

__all__ = ["OUTLIER_K", "StabilityMonitor", "StabilityProbe", "attention_logits", "outlier_share",
           "rms", "softmax_z", "stability_indicators"]
