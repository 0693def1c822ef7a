"""k-mixup (Greenewald et al., "k-Mixup Regularization for Deep Learning via Optimal Transport")
and mixup (Zhang et al.): the pure batch functions (core.py) and the Lightning callbacks that mix
every training batch (callback.py)."""
from .callback import KMixup, Mixup
from .core import assignment, kmixup_batch, kmixup_partners, mixup_batch, pairwise_cost, sample_lambda

__all__ = ["KMixup", "Mixup", "assignment", "kmixup_batch", "kmixup_partners", "mixup_batch",
           "pairwise_cost", "sample_lambda"]
