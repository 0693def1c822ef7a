"""User-level epsilon of ELS (example-level sampling) by group privacy, and its ledger.

Charles, Ganesh, McKenna, McMahan, Mitchell, Pillutla, Rush, "Fine-Tuning Large Language
Models with User-Level Differential Privacy" (arXiv 2407.07737), Sec. 3, Alg. 1: every user
is capped at k examples once, then example-level DP-SGD runs. A user is then a group of
<= k examples, and the (epsilon, delta) group-privacy lemma (Dwork & Roth 2014; Vadhan 2017,
Lemma 2.2) turns an (e, d)-DP mechanism into a (k e, k exp((k-1) e) d)-DP one for groups of
k. ULS needs none of this: its ledger is the ordinary one over users (:mod:`.budget`).
"""
from __future__ import annotations

import math
import warnings

from .budget import Ledger


def _rdp_epsilon_at(segments):
    """delta -> RDP epsilon of the example-level ledger ``[(sigma, q, steps), ...]``; the
    RDP curve (Opacus's orders and formula, as ``accounting.epsilon(..., "rdp")``) is summed
    over the segments once, the conversion (Balle et al. 2020) done per delta, so the
    bisections below stay cheap."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis
    orders = RDPAccountant.DEFAULT_ALPHAS
    curve = sum(analysis.compute_rdp(q=float(q), noise_multiplier=float(s), steps=int(n),
                                     orders=orders) for s, q, n in segments)

    def at(delta: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(analysis.get_privacy_spent(orders=orders, rdp=curve, delta=delta)[0])
    return at


def group_epsilon(segments, k: int, delta: float, details: bool = False):
    """User-level epsilon, at user-level ``delta``, of the example-level ledger ``segments``
    run on data where every user owns at most ``k`` examples.

    The example-level run is (e(d), d)-DP for every d; group privacy makes it
    (k e(d), k exp((k-1) e(d)) d)-DP for a user. We pick the d with
    k exp((k-1) e(d)) d = delta (bisection on log d; the left side grows with d) and return
    k e(d) (with ``details``: also e(d) and d). RDP accounting: the search goes down to
    d = delta e^-30, where Opacus's PRV accountant gives up ("floating point errors will
    dominate"). inf when no such d exists; 0 for an empty ledger."""
    if k < 1:
        raise ValueError(f"examples_per_user={k}: need >= 1")
    segments = [(float(s), float(q), int(n)) for s, q, n in segments if int(n) > 0]
    if not segments:
        return (0.0, 0.0, delta / k) if details else 0.0
    eps_at = _rdp_epsilon_at(segments)
    if k == 1:
        e = eps_at(delta)
        return (e, e, delta) if details else e

    def log_user_delta(log_d: float) -> float:
        return math.log(k) + (k - 1) * eps_at(math.exp(log_d)) + log_d

    lo, hi = math.log(delta) - 30.0, math.log(delta / k)  # log_user_delta(hi) >= log delta
    if log_user_delta(lo) > math.log(delta):
        return (math.inf, math.inf, 0.0) if details else math.inf
    for _ in range(30):  # log d to 3e-8
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_user_delta(mid) <= math.log(delta) else (lo, mid)
    e = eps_at(math.exp(lo))
    return (k * e, e, math.exp(lo)) if details else k * e


def els_epsilon(noise_multiplier: float, sample_rate: float, steps: int, k: int,
                delta: float) -> float:
    """:func:`group_epsilon` of one segment: ``steps`` steps at (sigma, q)."""
    return group_epsilon([(noise_multiplier, sample_rate, steps)], k, delta)


def calibrate_els_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                        k: int) -> float:
    """Smallest sigma (to 0.1%) whose ELS user-level epsilon is <= target (bisection;
    epsilon falls as sigma grows)."""
    lo, hi = 0.1, 1.0
    while els_epsilon(hi, sample_rate, steps, k, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no sigma <= 1e4 reaches user-level epsilon {target_epsilon} "
                             f"with k={k}; raise the target or lower k")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if els_epsilon(mid, sample_rate, steps, k, delta) <= target_epsilon \
            else (mid, hi)
    return hi


class GroupLedger(Ledger):
    """The ELS ledger: example-level segments as usual, epsilon (and so the budget and the
    calibration) user-level by :func:`group_epsilon` with groups of ``k``. RDP only."""

    def __init__(self, k: int, delta: float, target_epsilon: float | None = None):
        super().__init__(delta, "rdp", target_epsilon)
        self.k = k

    def epsilon_of(self, segments: list) -> float:
        return group_epsilon(segments, self.k, self.delta)

    def details(self) -> tuple[float, float, float]:
        """(user-level epsilon, example-level epsilon, example-level delta) of the ledger."""
        return group_epsilon(self.segments, self.k, self.delta, details=True)

    def calibrate_sigma(self, sample_rate: float, steps: int) -> float:
        return calibrate_els_sigma(self.target, self.delta, sample_rate, steps, self.k)
