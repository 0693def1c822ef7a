"""Langevin noise (unadjusted Langevin / noisy gradient descent) and iterate averaging: the pure
noise step (core.py) and the Lightning callbacks (callback.py)."""
from .callback import IterateAveraging, LangevinNoise
from .core import add_langevin_noise_, add_sphere_noise_, retract, spherical_langevin_step, tangent

__all__ = ["IterateAveraging", "LangevinNoise", "add_langevin_noise_", "add_sphere_noise_", "retract",
           "spherical_langevin_step", "tangent"]
