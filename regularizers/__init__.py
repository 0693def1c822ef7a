"""Regularizers: pure functional cores plus thin Lightning callbacks."""
from .kmixup import assignment, kmixup_batch, kmixup_partners, mixup_batch, pairwise_cost
from .langevin import IterateAveraging, LangevinNoise
from .mixing import KMixup, Mixup
from .noise import add_langevin_noise_

__all__: list[str] = ["assignment", "kmixup_batch", "kmixup_partners", "mixup_batch",
                      "pairwise_cost", "KMixup", "Mixup", "LangevinNoise", "IterateAveraging",
                      "add_langevin_noise_"]
