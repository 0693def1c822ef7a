"""DP Wasserstein barycenters (regularizers.dp_barycenter): sensitivity measured black-box on
adversarial neighbours, noise scale against the calibration, epsilon against the analytic
Gaussian mechanism (Balle & Wang 2018, an independent formula), and bad input."""
import math

import numpy as np
import ot
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

from regularizers import barycenter_cost, dp_barycenter
from regularizers.dp_barycenter.mechanisms import (HISTOGRAM_SENSITIVITY, grid_counts, noisy_counts,
                                                   output_sensitivity, projection_step)

R = 1.0


def analytic_gaussian_epsilon(z: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism with noise multiplier z (Balle & Wang 2018, Thm 8):
    delta(eps) = Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z)."""
    f = lambda e: norm.cdf(0.5 / z - e * z) - math.exp(e) * norm.cdf(-0.5 / z - e * z) - delta
    return brentq(f, 0.0, 200.0)


def _release(measures, **kw):
    kw.setdefault("radius", R)
    return dp_barycenter(measures, kw.pop("k", 2), kw.pop("epsilon", math.inf), 1e-6, "output",
                         seed=kw.pop("seed", 0), **kw)


def test_output_sensitivity_black_box_adversarial():
    """Noise off, one update from the same public random support: replacing one point (moved
    far out in every direction, or onto another point) never moves the output by more than the
    stated bound max_i lambda_i 2R k^1.5 / n_i."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(5):
        ms = [np.clip(rng.standard_normal((30, 2)) * 0.4 + c, -0.8, 0.8)
              for c in ([0.2, 0.0], [-0.2, 0.2], [0.0, -0.2])]
        base = _release(ms, k=3, n_iter=1, seed=trial)
        for i in range(3):
            for j in range(6):
                nb = [x.copy() for x in ms]
                angle = 2 * np.pi * j / 6
                nb[i][rng.integers(30)] = 5 * np.array([np.cos(angle), np.sin(angle)]) if j % 2 else \
                    ms[(i + 1) % 3][rng.integers(30)]
                moved = np.linalg.norm(_release(nb, k=3, n_iter=1, seed=trial).support - base.support)
                worst = max(worst, moved / base.report["sensitivity"])
    assert 0.05 < worst <= 1.0 + 1e-9  # tight to within a small factor, never exceeded


def test_output_sensitivity_needs_a_generic_support():
    """At a support on a tie (all points on the axis equidistant from both atoms, so every
    split of them is optimal) the solver's choice among optimal plans can move the output past
    the bound: the reason the support must be random with a density, never data-chosen."""
    rng = np.random.default_rng(0)
    n, lam = 20, np.array([0.5, 0.5])
    X = np.array([[0.0, 1.0], [0.0, -1.0]])
    w = [np.full(n, 1.0 / n)] * 2
    bound = output_sensitivity(R, 2, lam, np.array([n, n]))
    worst = 0.0
    for _ in range(100):
        pts = np.c_[rng.uniform(-0.9, 0.9, n), np.zeros(n)]
        other = rng.uniform(-0.5, 0.5, (n, 2))
        base = projection_step(X, [pts, other], w, lam)
        for _ in range(10):
            q = pts.copy()
            q[rng.integers(n)] = rng.uniform(-0.7, 0.7, 2)
            worst = max(worst, np.linalg.norm(projection_step(X, [q, other], w, lam) - base) / bound)
    assert worst > 1.5


def test_projection_step_is_pots_update():
    rng = np.random.default_rng(1)
    ms = [rng.standard_normal((30, 3)) for _ in range(4)]
    w = [np.full(30, 1 / 30)] * 4
    X0 = rng.standard_normal((5, 3))
    ref = ot.lp.free_support_barycenter(ms, w, X0.copy(), numItermax=1)
    np.testing.assert_allclose(projection_step(X0, ms, w, np.full(4, 0.25)), ref, atol=1e-10)


def test_histogram_sensitivity_black_box():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1.2, 1.2, (200, 2))
    base = grid_counts(np.clip(x, -R, R), np.zeros(2), R, 8)
    worst = 0.0
    for _ in range(200):
        y = x.copy()
        y[rng.integers(200)] = rng.uniform(-3, 3, 2)
        c = grid_counts(np.clip(y, -R, R), np.zeros(2), R, 8)
        worst = max(worst, np.linalg.norm(c - base))
    assert worst == pytest.approx(HISTOGRAM_SENSITIVITY)


@pytest.mark.slow
def test_noise_scale_matches_calibration():
    rng = np.random.default_rng(3)
    ms = [rng.uniform(-0.5, 0.5, (20, 2)) for _ in range(2)]
    resid, std = [], None
    for s in range(150):
        clean = _release(ms, k=3, n_iter=1, seed=s)
        noisy = _release(ms, k=3, n_iter=1, seed=s, epsilon=2.0)
        resid.append(noisy.support - clean.support)
        std = noisy.report["noise_std"]
    emp = np.std(np.concatenate(resid))
    assert std == pytest.approx(noisy.report["noise_multiplier"] * 2 * R * 3 ** 1.5 / 2 / 20)
    assert emp == pytest.approx(std, rel=0.08)  # 900 draws: sampling error ~2.4%
    x = rng.uniform(-1, 1, (100, 2))
    draws = [noisy_counts(x, np.zeros(2), R, 4, 3.0, np.random.default_rng(s)) - grid_counts(x, np.zeros(2), R, 4)
             for s in range(60)]
    assert np.std(draws) == pytest.approx(3.0, rel=0.08)


@pytest.mark.parametrize("mechanism,releases", [("output", 1), ("output", 4), ("coreset", 1)])
def test_epsilon_matches_analytic_gaussian(mechanism, releases):
    """T releases at noise multiplier z compose exactly to one at z / sqrt(T) (Gaussian DP)."""
    rng = np.random.default_rng(4)
    ms = [rng.uniform(-1, 1, (50, 2)) for _ in range(2)]
    r = dp_barycenter(ms, 2, 1.5, 1e-5, mechanism, radius=R, n_iter=releases, bins=4).report
    exact = analytic_gaussian_epsilon(r["noise_multiplier"] / math.sqrt(r["releases"]), 1e-5)
    assert r["releases"] == releases
    assert exact <= r["epsilon"] * (1 + 1e-3)  # PRV reports an upper bound
    assert r["epsilon"] == pytest.approx(exact, rel=0.02)
    assert r["epsilon"] <= 1.5  # calibrated to the target


def test_coreset_route_is_accurate_at_moderate_epsilon():
    rng = np.random.default_rng(5)
    ms = [rng.standard_normal((400, 2)) * 0.2 + c for c in ([0.3, 0.0], [-0.3, 0.1], [0.0, -0.3])]
    ref = min(barycenter_cost(_release(ms, k=4, n_iter=20, seed=s).support, None, ms) for s in range(3))
    r = dp_barycenter(ms, 4, 8.0, 1e-5, "coreset", radius=R)
    assert barycenter_cost(r.support, r.weights, ms) < 1.5 * ref


@pytest.mark.parametrize("bad,match", [
    (dict(measures=[np.zeros((5, 2)), np.zeros((5, 3))]), "different dimensions"),
    (dict(n_support=0), "n_support"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(delta=0.1), "delta"),
    (dict(radius=None), "radius"),
    (dict(mechanism="laplace"), "mechanism"),
    (dict(measures=[np.zeros((0, 2))]), "non-empty"),
])
def test_bad_input(bad, match):
    args = dict(measures=[np.zeros((5, 2)), np.ones((5, 2))], n_support=2, epsilon=1.0, delta=1e-3,
                mechanism="output", radius=R)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        dp_barycenter(args.pop("measures"), args.pop("n_support"), args.pop("epsilon"),
                      args.pop("delta"), args.pop("mechanism"), **args)
