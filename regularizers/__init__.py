"""Regularizers and step controls. Each method is a subpackage named after it: a pure functional
core (``core.py``, or several modules for DP-SGD) and a thin Lightning callback (``callback.py``).
Shared pieces: ``batch_transforms`` (callbacks that rewrite training batches) and ``step_hooks``
(callbacks acting around ``optimizer.step()``)."""
from .dp import DPSGD
from .dp_barycenter import barycenter_cost, dp_barycenter
from .kmixup import KMixup, Mixup, assignment, kmixup_batch, kmixup_partners, mixup_batch, pairwise_cost
from .batch_transforms import BatchTransform
from .langevin import IterateAveraging, LangevinNoise, add_langevin_noise_
from .lr_spike import LRSpike
from .ghosts import RadiusControl, directional_logits, logit_spread, softmax_radius

__all__: list[str] = ["BatchTransform", "DPSGD", "IterateAveraging", "KMixup", "LangevinNoise", "LRSpike", "Mixup",
                      "RadiusControl", "directional_logits", "logit_spread", "softmax_radius",
                      "add_langevin_noise_", "assignment", "barycenter_cost", "dp_barycenter", "kmixup_batch", "kmixup_partners",
                      "mixup_batch", "pairwise_cost"]
