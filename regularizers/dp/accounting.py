"""Privacy accounting for the Poisson-subsampled Gaussian mechanism, via Opacus.

A ledger is Opacus's accountant history: a list of ``(sigma, q, steps)`` segments.
``rdp``: Renyi DP of the sampled Gaussian (Mironov, Talwar & Zhang 2019) with the
conversion of Balle et al. 2020; ``prv``: numerical composition of privacy loss random
variables (Gopi, Lee & Wutschitz 2021), reporting its UPPER bound on epsilon.
"""
from __future__ import annotations

import warnings

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}
Ledger = list[tuple[float, float, int]]


def _check(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r}: choose one of {sorted(ACCOUNTANTS)}")


def epsilon(ledger: Ledger, delta: float, accountant: str = "prv") -> float:
    """(epsilon, delta)-DP epsilon spent by the ledger's steps (0 for an empty ledger)."""
    _check(accountant)
    ledger = [(float(s), float(q), int(n)) for s, q, n in ledger if n > 0]
    if not ledger:
        return 0.0
    acc = ACCOUNTANTS[accountant]()
    acc.history = ledger
    with warnings.catch_warnings():  # Opacus's "optimal order is the largest alpha" note
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def calibrate_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv") -> float:
    """Smallest sigma (to 0.01 in epsilon) with epsilon(sigma, q, steps) <= target."""
    _check(accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sigma = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                     sample_rate=sample_rate, steps=steps, accountant=accountant)
    if epsilon([(sigma, sample_rate, steps)], delta, accountant) > target_epsilon:
        raise RuntimeError("calibrated sigma misses the target epsilon; this is a bug")
    return float(sigma)


# Steps searched per (sigma, q) segment: 2^20, more than any run here takes; a budget that
# allows more is reported as this many (the run stops on max_steps/epochs first).
MAX_STEPS_SEARCHED = 1 << 20


def max_steps(ledger: Ledger, sigma: float, sample_rate: float, target_epsilon: float,
              delta: float, accountant: str = "prv", upper: int = MAX_STEPS_SEARCHED) -> int:
    """Largest n such that the ledger plus n more steps stays within ``target_epsilon``."""
    return largest_within(lambda n: epsilon(ledger + [(sigma, sample_rate, n)], delta,
                                            accountant) <= target_epsilon, upper)


def largest_within(ok, upper: int = MAX_STEPS_SEARCHED) -> int:
    """Largest n <= ``upper`` with ``ok(n)``, for ``ok`` true up to some n and false after
    (epsilon grows with steps): doubling, then bisection."""
    if not ok(0):
        return 0
    hi = 1
    while hi < upper and ok(hi):
        hi *= 2
    if hi >= upper and ok(upper):
        return upper
    lo = hi // 2  # ok(lo), not ok(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo
