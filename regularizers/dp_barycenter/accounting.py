"""Privacy accounting of the barycenter mechanisms: Gaussian releases counted in the same ledger
format and by the same accountant code as DP-SGD (``regularizers.dp.accounting``).

A release of ``f(D) + N(0, (z * Delta)^2 I)`` with L2 sensitivity ``Delta`` is the sampled
Gaussian mechanism at sampling rate q = 1 with noise multiplier ``z``; ``T`` such releases are
the ledger segment ``(z, 1.0, T)``. Under replace-one adjacency the privacy loss of one release
is that of N(0, z^2) against N(1, z^2) as long as ``Delta`` bounds the replace-one change, which
is what each mechanism's sensitivity states.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from regularizers.dp.accounting import Ledger, calibrate_sigma, epsilon


@lru_cache(maxsize=256)  # a pure function of its arguments, and each search costs ~0.5 s
def noise_multiplier(target_epsilon: float, delta: float, releases: int,
                     accountant: str = "prv") -> float:
    """Smallest z (to the accountant's search tolerance) whose ``releases``-fold composition of
    the Gaussian mechanism stays within ``target_epsilon`` at ``delta``."""
    with np.errstate(divide="ignore"):  # Opacus's PRV takes log(1 - q) = log 0 at q = 1
        return calibrate_sigma(target_epsilon, delta, sample_rate=1.0, steps=releases,
                               accountant=accountant)


def gaussian_report(z: float, releases: int, sensitivity: float, delta: float,
                    accountant: str = "prv", **fields) -> dict:
    """The privacy report of ``releases`` Gaussian releases of noise std ``z * sensitivity``."""
    ledger: Ledger = [(float(z), 1.0, int(releases))]
    with np.errstate(divide="ignore"):
        eps = epsilon(ledger, delta, accountant)
    return {"epsilon": eps, "delta": float(delta),
            "noise_multiplier": float(z), "sensitivity": float(sensitivity),
            "noise_std": float(z * sensitivity), "releases": int(releases),
            "accountant": accountant, "ledger": [list(s) for s in ledger], **fields}
