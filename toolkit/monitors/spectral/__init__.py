"""The spectral condition for feature learning (Yang, Simon & Bernstein 2023): power iteration
(core.py) and the monitor callback logging ||W||_2 and ||dW||_2 over sqrt(fan_out/fan_in)
(callback.py)."""
from optimizers.orientation import spectral_scale

from .callback import SpectralMonitor
from .core import power_iteration

__all__ = ["SpectralMonitor", "power_iteration", "spectral_scale"]
