"""Banded matrix-factorization (BandMF) noise: strategies, sensitivity, online generator.

The matrix mechanism releases prefix sums ``A G`` of the clipped gradient sums ``G`` as
``B (C G + Z)`` with ``A = B C``; equivalently every step adds ``(C^-1 Z)_t`` instead of
``Z_t`` (Choquette-Choo et al., "(Amplified) Banded Matrix Factorization", NeurIPS 2023,
Sec. 2). Here ``C`` is lower-triangular Toeplitz with ``b`` bands: column 0 is
``(c_0, ..., c_{b-1}, 0, ...)``, so ``C^-1 z`` is a forward substitution over the
previous ``b - 1`` released noise vectors (their Alg. 9; jax-privacy's
``toeplitz.inverse_as_streaming_matrix``).

Strategies (coefficients, float64, scaled to unit column norm so the sensitivity is 1):

* ``"bsr"``: the banded square root of Kalinin & Lampert 2024 (BSR, Def. 1 / Thm. 1): the
  Toeplitz square root ``A^(1/2)`` of the workload, cut to ``b`` bands. For the prefix-sum
  workload ``r_k = |binom(-1/2, k)|`` (1, 1/2, 3/8, ...; jax-privacy's
  ``optimal_max_error_strategy_coefs``); with heavy-ball momentum ``beta`` the workload has
  generating function ``1/((1-x)(1-beta x))`` and the root is the convolution of the two
  roots (their Thm. 1 without weight decay).
* ``"optimized"``: minimizes the expected mean squared error of all prefix sums times the
  squared sensitivity, ``mean_t sum_{s<=t} (C^-1 A)_{t0s}^2 * ||c||^2`` (McKenna 2025,
  "Scaling up the banded matrix factorization mechanism", Eq. 3; jax-privacy's
  ``toeplitz.loss`` / ``optimize_banded_toeplitz``), by L-BFGS in float64 from the BSR.

With ``b``-min-separated participation (cyclic Poisson sampling, ``cyclic_poisson.py``),
one example's participations hit disjoint row blocks of ``C``, so each is a Gaussian
mechanism of sensitivity ``max column norm = ||c||_2`` (2023 paper, Thm. 4).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.signal import lfilter

STRATEGIES = ("bsr", "optimized")
CHUNK = 1 << 16  # floats per slice of the CPU noise recursion (BandedNoise.draw_)


def _check_bands(bands: int, n: int | None = None) -> None:
    if not isinstance(bands, int) or bands < 1:
        raise ValueError(f"bands={bands!r}: need an integer >= 1 (1 = independent noise)")
    if n is not None and (not isinstance(n, int) or n < bands):
        raise ValueError(f"n={n!r} steps: need an integer >= bands={bands}")


def workload_coefs(n: int, momentum: float = 0.0) -> np.ndarray:
    """Column 0 of the Toeplitz workload: prefix sums (``momentum=0``) or the weights
    ``(1 - beta^(k+1)) / (1 - beta)`` that heavy-ball momentum puts on gradient ``t - k``."""
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum={momentum}: need 0 <= momentum < 1")
    k = np.arange(n, dtype=np.float64)
    return np.ones(n) if momentum == 0 else (1 - momentum ** (k + 1)) / (1 - momentum)


def toeplitz_sqrt(a: np.ndarray) -> np.ndarray:
    """Coefficients r of the lower-triangular Toeplitz R with R R = Toeplitz(a), r_0 > 0:
    matching x^k in r(x)^2 = a(x) gives r_k = (a_k - sum_{0<j<k} r_j r_{k-j}) / (2 r_0)."""
    a = np.asarray(a, dtype=np.float64)
    if a[0] <= 0:
        raise ValueError("the workload's diagonal must be positive to have a square root")
    r = np.zeros_like(a)
    r[0] = math.sqrt(a[0])
    for k in range(1, len(a)):
        r[k] = (a[k] - r[1:k] @ r[k - 1:0:-1]) / (2 * r[0])
    return r


def bsr_coefs(bands: int, momentum: float = 0.0) -> np.ndarray:
    """Banded square root (Kalinin & Lampert 2024), unnormalized (``c_0 = 1``)."""
    _check_bands(bands)
    return toeplitz_sqrt(workload_coefs(bands, momentum))


def _loss_and_grad(c: np.ndarray, a: np.ndarray) -> tuple[float, np.ndarray]:
    """McKenna 2025 Eq. 3 and its gradient. B = C^-1 A is Toeplitz with column 0
    ``h = lfilter(1, c, a)`` (the IIR recursion of a forward substitution); mean_t of the
    cumulative error counts ``h_k^2`` in ``n - k`` of the ``n`` prefixes. Since
    d h / d c_j = -x^j C^-1 h, the gradient is a correlation with ``C^-1 h``."""
    n = len(a)
    h = lfilter([1.0], c, a)
    w = (n - np.arange(n)) / n
    err, s2 = float(w @ h**2), float(c @ c)
    v = 2 * w * h
    d = lfilter([1.0], c, h)
    grad_err = -np.array([v[j:] @ d[:n - j] for j in range(len(c))])
    return err * s2, grad_err * s2 + err * 2 * c


def _coefs_from_ratios(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """c_0 = 1, c_k = c_{k-1} sigmoid(theta_k): positive and decreasing, so by the
    Enestrom-Kakeya theorem every root of c(x) lies outside the unit disk and C^-1 stays
    bounded (a root inside makes it grow like |root|^-n and the loss overflow)."""
    s = 1 / (1 + np.exp(-theta))
    return np.concatenate([[1.0], np.cumprod(s)]), s


def optimized_coefs(n: int, bands: int, momentum: float = 0.0,
                    max_iter: int = 5000) -> np.ndarray:
    """Banded Toeplitz coefficients minimizing the workload's expected mean squared
    error x squared sensitivity over ``n`` steps (McKenna 2025), by L-BFGS from the BSR.
    The loss is invariant to scaling c, so c_0 is held at 1 (no flat direction) and the
    result is returned at unit norm; the search runs over positive decreasing c
    (``_coefs_from_ratios``). The optimum lies inside that set: it matches jax-privacy's
    unconstrained optimum (prefix sums), and for momentum 0.5 / 0.9 an unconstrained
    restart from it finds nothing lower (tests/test_dp_bandmf.py)."""
    _check_bands(bands, n)
    a = workload_coefs(n, momentum)
    x0 = bsr_coefs(bands, momentum)
    if bands == 1:
        return x0 / np.linalg.norm(x0)

    def fun(theta):
        c, s = _coefs_from_ratios(theta)
        f, g = _loss_and_grad(c, a)
        # dc_k / dtheta_j = c_k (1 - s_j) for 1 <= j <= k
        return f, (1 - s) * np.cumsum((g * c)[::-1])[::-1][1:]

    r = np.clip(x0[1:] / x0[:-1], 1e-9, 1 - 1e-9)  # BSR ratios lie in (0, 1) already
    res = minimize(fun, np.log(r / (1 - r)), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "ftol": 1e-16, "gtol": 1e-12})
    c = _coefs_from_ratios(res.x)[0]
    if not np.all(np.isfinite(c)) or fun(res.x)[0] > fun(np.log(r / (1 - r)))[0]:
        raise RuntimeError(f"strategy optimization failed ({res.message}); this is a bug")
    return c / np.linalg.norm(c)


def strategy(kind: str, bands: int, n: int | None = None,
             momentum: float = 0.0) -> np.ndarray:
    """Unit-column-norm coefficients ``c`` of the b-banded Toeplitz strategy ``C``.
    ``n`` (total steps) is needed by ``"optimized"`` only."""
    if kind not in STRATEGIES:
        raise ValueError(f"strategy={kind!r}: choose one of {STRATEGIES}")
    if kind == "bsr":
        c = bsr_coefs(bands, momentum)
        return c / np.linalg.norm(c)
    if n is None:
        raise ValueError("strategy='optimized' needs n, the number of training steps")
    return optimized_coefs(n, bands, momentum)


def sensitivity(coefs: Sequence[float], n: int | None = None) -> float:
    """Maximum column norm of the n x n Toeplitz C (column 0 is the longest): the
    per-participation sensitivity under b-min-separation (2023 paper, Thm. 4)."""
    c = np.asarray(coefs, dtype=np.float64)[:n]
    return float(np.sqrt(c @ c))


def minsep_sensitivity(coefs: Sequence[float], n: int, min_sep: int,
                       max_participations: int) -> float:
    """Sensitivity of C G over ALL of one example's participations (no amplification):
    for non-negative, non-increasing c the worst pattern is k participations exactly
    ``min_sep`` apart from step 0 (McKenna et al. 2024, arXiv 2405.13763, Thm. 2)."""
    c = np.zeros(n)
    m = min(n, len(coefs))
    c[:m] = np.asarray(coefs, dtype=np.float64)[:m]
    if np.any(c < 0) or np.any(np.diff(c[:m]) > 0):
        raise ValueError("minsep_sensitivity needs non-negative, non-increasing coefs")
    v = np.zeros(n)
    for i in range(0, min(n, min_sep * max_participations), min_sep):
        v[i:] += c[:n - i]
    return float(np.linalg.norm(v))


class BandedNoise:
    """Online noise ``x_t = (C^-1 z)_t`` for a b-banded Toeplitz C, one flat vector per step:

        x_t = z_t / c_0 - sum_{j=1}^{b-1} (c_j / c_0) x_{t-j},     z_t ~ N(0, std^2 I)

    State: ``b`` model-sized rows on ``device`` (fp32 or fp64), row ``s mod b`` holding
    ``x_s`` for the last ``b - 1`` steps, plus the row step t writes; and the step count.
    :meth:`draw_` writes ``x_t`` into its row in place and returns that row: one draw into
    it (``z`` at std ``std / c_0``) and at most two ``addmv_`` over the other rows, slice by
    slice on CPU, no allocation and no copy (the hot path of ``DPSGD(noise="bandmf")``). ``__call__``
    returns a copy the caller owns. ``state_dict`` / ``load_state_dict`` resume exactly
    when the caller's z generator is also reproducible (e.g. seeded per step). With
    ``b = 1`` (c = [1]) ``z`` is drawn exactly as ``mechanism.noisy_mean_`` draws
    DP-SGD's noise: the very same vector for the same generator.
    """

    def __init__(self, coefs: Sequence[float], numel: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        c = [float(x) for x in coefs]
        if not c or not all(math.isfinite(x) for x in c) or c[0] <= 0:
            raise ValueError(f"coefs={coefs!r}: need finite coefficients with c_0 > 0")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype}: the noise recursion runs in float32 or float64")
        self.coefs, self.numel, self.dtype = c, int(numel), dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.bands, self.step = len(c), 0
        b = self.bands
        self.rows = torch.zeros(b if b > 1 else 0, self.numel, device=self.device, dtype=dtype)
        # For the row k = t mod b being written, the other rows form at most two contiguous
        # blocks (after k, before k); row j holds x_{t-lag} with lag = (k - j) mod b. Their
        # weights -c_lag / c_0 are built once on the device: a step copies nothing to it.
        self._blocks = []
        for k in range(b if b > 1 else 0):
            blocks = []
            for lo, hi in ((k + 1, b), (0, k)):
                if hi > lo:
                    w = [-c[(k - j) % b] / c[0] for j in range(lo, hi)]
                    blocks.append((lo, hi, torch.tensor(w, device=self.device, dtype=dtype)))
            self._blocks.append(blocks)

    def _check(self, generator) -> None:
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator on {generator.device}, noise buffers on {self.device}: "
                             "create the generator on the parameters' device")

    def draw_(self, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next noise vector (shape ``(numel,)``), advancing the state. For ``b > 1``
        it is the state's own row: read it, never write it, and do not keep it past the
        next ``b - 1`` draws (clone to keep)."""
        self._check(generator)
        c0 = self.coefs[0]
        if self.bands == 1:  # c = [1] leaves z untouched: bit-identical to DP-SGD's draw
            z = torch.normal(0.0, std, (self.numel,), generator=generator, device=self.device,
                             dtype=self.dtype)
            self.step += 1
            return z / c0 if c0 != 1.0 else z
        k = self.step % self.bands
        x = self.rows[k]
        # On CPU in slices of CHUNK: each slice is drawn and then corrected while it is in
        # cache, so the recursion costs about nothing beyond the draw (measured: the
        # unsliced addmv_ added 25-30% to a 3.7M draw on one thread, the sliced one ~0).
        # The CPU generator's stream does not depend on the slicing: z is the same.
        step = CHUNK if self.device.type == "cpu" else self.numel
        for i in range(0, self.numel, step):
            j = min(self.numel, i + step)
            torch.normal(0.0, std / c0, (j - i,), generator=generator, out=x[i:j])
            for lo, hi, w in self._blocks[k]:  # BLAS gemv: x += rows[lo:hi]^T w, in place
                x[i:j].addmv_(self.rows[lo:hi, i:j].T, w)
        self.step += 1
        return x

    def __call__(self, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next noise vector as a tensor of the caller's own; advances the state."""
        x = self.draw_(std, generator)
        return x.clone() if self.bands > 1 else x

    def history(self) -> torch.Tensor:
        """``(b - 1, numel)``: x_{t-1}, ..., x_{t-b+1} (zeros before the first steps)."""
        b = self.bands
        idx = [(self.step - j) % b for j in range(1, b)]
        return self.rows[idx].clone() if b > 1 else self.rows.new_zeros(0, self.numel)

    def state_dict(self) -> dict:
        return {"coefs": list(self.coefs), "step": self.step, "history": self.history()}

    def load_state_dict(self, state: dict) -> None:
        if [float(x) for x in state["coefs"]] != self.coefs:
            raise ValueError("checkpoint's BandMF coefficients differ from this run's; resume "
                             "with the same bands, strategy and steps")
        h = state["history"]
        if tuple(h.shape) != (self.bands - 1, self.numel):
            raise ValueError(f"checkpoint's noise history has shape {tuple(h.shape)}, this "
                             f"model needs {(self.bands - 1, self.numel)}; resume the same model")
        self.step = int(state["step"])
        for j in range(1, self.bands):
            self.rows[(self.step - j) % self.bands].copy_(h[j - 1].to(self.device, self.dtype))
