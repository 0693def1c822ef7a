"""Privacy of the MFLD generator: every step releases each observed snapshot's clipped sum of
per-person gradients plus Gaussian noise (full batch, sampling rate 1), so ``steps`` steps are
the DP-SGD ledger segment (sigma, 1.0, steps), with sigma the noise std over the person's
add/remove sensitivity (``core.person_sensitivity``). Accounted by regularizers.dp.accounting."""
from __future__ import annotations

import math

import numpy as np

from regularizers.dp.accounting import calibrate_sigma, epsilon

from .core import person_sensitivity


def step_noise(target_epsilon: float, delta: float, steps: int, clip: float, adjacency: str,
               n_observed: int, accountant: str = "prv") -> tuple[float, float]:
    """(sigma, noise std on each snapshot's clipped sum) for ``target_epsilon`` (inf: no noise)."""
    sens = person_sensitivity(clip, adjacency, n_observed)
    if math.isinf(target_epsilon):
        return 0.0, 0.0
    with np.errstate(divide="ignore"):  # Opacus's PRV takes log(1 - q) = log 0 at q = 1
        sigma = calibrate_sigma(target_epsilon, delta, 1.0, steps, accountant)
    return sigma, sigma * sens


def privacy_report(sigma: float, steps: int, delta: float, clip: float, adjacency: str,
                   n_observed: int, n_people: int, accountant: str = "prv") -> dict:
    ledger = [(float(sigma), 1.0, int(steps))] if sigma > 0 else []
    with np.errstate(divide="ignore"):
        eps = epsilon(ledger, delta, accountant) if ledger else math.inf
    return {"epsilon": eps, "delta": delta, "noise_multiplier": sigma, "steps": steps,
            "sample_rate": 1.0, "accountant": accountant, "max_grad_norm": clip,
            "sensitivity": person_sensitivity(clip, adjacency, n_observed), "adjacency": adjacency,
            "people": n_people, "ledger": [list(s) for s in ledger],
            "analysis": ("full-batch Gaussian mechanism per step on the clipped per-person data "
                         "gradients of all observed snapshots (add/remove adjacency); the "
                         "self-interaction, path energy and Langevin noise never read the data")}
