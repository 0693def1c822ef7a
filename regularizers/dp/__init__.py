"""DP-SGD (Abadi et al. 2016): functional core (no Lightning) and the ``DPSGD`` callback."""
from .accounting import calibrate_sigma, epsilon, max_steps
from .budget import Ledger
from .callback import DPSGD
from .errors import PrivacyError
from .mechanism import clip_factors, clipped_sum, noisy_mean_, privatize_
from .per_sample import PerSampleGradients
from .probe import probe
from .sampling import PoissonBatchSampler, PoissonLoader
from .validate import check_callbacks, check_model, check_optimizers, check_step, check_trainer

__all__ = ["DPSGD", "Ledger", "PerSampleGradients", "PoissonBatchSampler", "PoissonLoader",
           "PrivacyError", "calibrate_sigma", "check_callbacks", "check_model",
           "check_optimizers", "check_step", "check_trainer", "clip_factors", "clipped_sum",
           "epsilon", "max_steps", "noisy_mean_", "privatize_", "probe"]
