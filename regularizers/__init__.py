"""Regularizers: pure functional cores plus thin Lightning callbacks."""
from .dp import DPSGD
from .kmixup import assignment, kmixup_batch, kmixup_partners, mixup_batch, pairwise_cost
from .batch_transforms import BatchTransform
from .langevin import IterateAveraging, LangevinNoise
from .mixing import KMixup, Mixup
from .noise import add_langevin_noise_
from .lr_spike import LRSpike
from .softmax_radius import directional_logits, logit_spread, softmax_radius
from .step_control import RadiusControl

__all__: list[str] = ["BatchTransform", "DPSGD", "IterateAveraging", "KMixup", "LangevinNoise", "LRSpike", "Mixup",
                      "RadiusControl", "directional_logits", "logit_spread", "softmax_radius",
                      "add_langevin_noise_", "assignment", "kmixup_batch", "kmixup_partners",
                      "mixup_batch", "pairwise_cost"]
