"""DP-SGD (Abadi et al. 2016): functional core (no Lightning) and the ``DPSGD`` callback."""
from .accounting import calibrate_sigma, epsilon, max_steps
from .callback import DPSGD
from .mechanism import clip_factors, clipped_sum, noisy_mean_, privatize_
from .per_sample import PerSampleGradients
from .sampling import PoissonBatchSampler, PoissonLoader
from .validate import PrivacyError, check_callbacks, check_model, check_trainer

__all__ = ["DPSGD", "PerSampleGradients", "PoissonBatchSampler", "PoissonLoader", "PrivacyError",
           "calibrate_sigma", "check_callbacks", "check_model", "check_trainer", "clip_factors",
           "clipped_sum", "epsilon", "max_steps", "noisy_mean_", "privatize_"]
