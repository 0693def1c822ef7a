"""The privacy ledger and its budget: pure bookkeeping over :mod:`.accounting`, no Lightning.

A ledger is the accountant's history, ``(sigma, q, steps)`` segments. A budget answers
"does one more step at (sigma, q) stay within target_epsilon?" for whatever q the current
step has: the step limit is recomputed whenever (sigma, q) changes, so a sample rate that
grows mid-run (a reloaded loader with a larger batch) can never carry the run past its
target on a limit computed for the old rate.

The ledger also counts the fits that released steps under it (``fits``, kept in
checkpoints): a fit that is not the first one of its ledger (a second ``trainer.fit`` of the
same callback, any resume) must draw fresh noise and batches, see ``DPSGD``.
"""
from __future__ import annotations

import math

from . import accounting


class Ledger:
    def __init__(self, delta: float, accountant: str = "prv", target_epsilon: float | None = None):
        self.delta, self.accountant, self.target = delta, accountant, target_epsilon
        self.segments: list[list] = []
        self.fits = 0  # fits started under this ledger, this one included once started
        self._limit: tuple | None = None  # ((sigma, q), total steps allowed at that rate)

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.segments)

    def add(self, sigma: float, q: float) -> None:
        if self.segments and self.segments[-1][:2] == [sigma, q]:
            self.segments[-1][2] += 1
        else:
            self.segments.append([sigma, q, 1])

    def epsilon(self, extra: tuple | None = None) -> float:
        return self.epsilon_of([tuple(s) for s in self.segments] + ([extra] if extra else []))

    def epsilon_of(self, segments: list) -> float:
        """Epsilon of another history at this ledger's delta and accountant."""
        return accounting.epsilon([tuple(s) for s in segments], self.delta, self.accountant)

    def calibrate_sigma(self, sample_rate: float, steps: int) -> float:
        """Smallest sigma whose ``steps`` steps at ``sample_rate`` spend at most the target."""
        return accounting.calibrate_sigma(self.target, self.delta, sample_rate, steps,
                                          self.accountant)

    def allows(self, sigma: float, q: float) -> bool:
        """True if one more step at (sigma, q) keeps epsilon <= target (always without one)."""
        if self.target is None:
            return True
        if self._limit is None or self._limit[0] != (sigma, q):
            spent = [tuple(s) for s in self.segments]  # epsilon_of: GroupLedger's too
            more = accounting.largest_within(
                lambda n: self.epsilon_of(spent + [(sigma, q, n)]) <= self.target)
            self._limit = ((sigma, q), self.steps + more)
        if self.steps + 1 <= self._limit[1]:
            return True
        return self.epsilon((sigma, q, 1)) <= self.target  # past the searched range

    def remaining(self, sigma: float, q: float) -> float:
        """Steps left at (sigma, q) within the target (inf without one)."""
        if self.target is None:
            return math.inf
        self.allows(sigma, q)
        return max(0, self._limit[1] - self.steps)

    def start_fit(self) -> int:
        """Count one more fit under this ledger; returns how many started before it."""
        self.fits += 1
        return self.fits - 1

    def state_dict(self) -> dict:
        return {"ledger": [list(s) for s in self.segments], "fits": self.fits}

    def load_state_dict(self, state: dict) -> None:
        self.segments = [list(s) for s in state["ledger"]]
        # a checkpoint without the count (older versions) was written by at least one fit
        self.fits = int(state.get("fits", 1))
        self._limit = None
