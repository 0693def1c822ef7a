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

# BandMF noise, cyclic Poisson sampling and user-level cores (pure; the callback wires them).
from .bandmf import BandedNoise  # noqa: E402
from .bandmf import sensitivity as bandmf_sensitivity, strategy as bandmf_strategy  # noqa: E402
from .cyclic_poisson import (CyclicPoissonBatchSampler, accounting_params,  # noqa: E402
                             bandmf_epsilon, calibrate_bandmf_sigma, cyclic_poisson_batch,
                             partitions)
from .user_accounting import calibrate_els_sigma, els_epsilon, group_epsilon  # noqa: E402
from .user_level import (UserBatchSampler, group_by_user, user_clipped_sum,  # noqa: E402
                         user_clipped_sum_pieces)

__all__ += ["BandedNoise", "CyclicPoissonBatchSampler", "accounting_params", "bandmf_epsilon",
            "bandmf_sensitivity", "bandmf_strategy", "calibrate_bandmf_sigma",
            "calibrate_els_sigma", "cyclic_poisson_batch", "els_epsilon", "group_by_user",
            "group_epsilon",
            "partitions", "UserBatchSampler", "user_clipped_sum", "user_clipped_sum_pieces"]
