"""Regularizers and step controls. Each method is a subpackage named after it: a pure functional
core (``core.py``, or several modules for DP-SGD) and a thin Lightning callback (``callback.py``).
Shared pieces: ``batch_transforms`` (callbacks that rewrite training batches) and ``step_hooks``
(callbacks acting around ``optimizer.step()``). ``step_control`` gathers the callbacks that
act on the optimizer step itself (RadiusControl, LRSpike)."""
from .dp import DPSGD
from .dp_barycenter import barycenter_cost, dp_barycenter
from .kmixup import KMixup, Mixup, assignment, kmixup_batch, kmixup_partners, mixup_batch, pairwise_cost
from .batch_transforms import BatchTransform
from .langevin import IterateAveraging, LangevinNoise, add_langevin_noise_
from .ghosts import directional_logits, logit_spread, softmax_radius
from .step_control import LRSpike, QKClip, RadiusControl

__all__: list[str] = ["BatchTransform", "DPSGD", "IterateAveraging", "KMixup", "LangevinNoise", "LRSpike", "Mixup", "QKClip",
                      "RadiusControl", "directional_logits", "logit_spread", "softmax_radius",
                      "add_langevin_noise_", "assignment", "barycenter_cost", "dp_barycenter", "kmixup_batch", "kmixup_partners",
                      "mixup_batch", "pairwise_cost"]
