"""The digit-shape trajectory data (toolkit/data/shapes.py): points follow the image's density,
the exact sampler agrees with an independent Euler-Maruyama integration of the stated drift,
and the data module gives one point per person at the observed times."""
import math

import numpy as np
import pytest

from toolkit.data.idx import DataError
from toolkit.data.shapes import DigitSnapshots, digit_drift, sample_digit, simulate_digit


def test_points_follow_the_pixel_density():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4, (6, 5)).astype(float) ** 2  # many zero pixels, uneven weights
    x = sample_digit(image, 200_000, rng)
    # back to pixel indices: row 0 is the top (y near 1)
    col = np.floor((x[:, 0] + 1) / 2 * 5).astype(int)
    row = np.floor((1 - x[:, 1]) / 2 * 6).astype(int)
    freq = np.bincount(row * 5 + col, minlength=30).reshape(6, 5) / len(x)
    np.testing.assert_allclose(freq, image / image.sum(), atol=3e-3)
    assert freq[image == 0].sum() == 0


def euler_maruyama(x0, times, omega, velocity, centre, noise, rng, dt=1e-3):
    """An independent integration of dX = b(X, t) dt + noise dW with ``digit_drift``."""
    x, t, out = x0.copy(), 0.0, []
    for target in times:
        while t < target - 1e-12:
            h = min(dt, target - t)
            # Heun for the drift, so the comparison is not limited by Euler's O(dt) error
            pred = x + digit_drift(x, t, omega, velocity, centre) * h
            x = x + 0.5 * (digit_drift(x, t, omega, velocity, centre)
                           + digit_drift(pred, t + h, omega, velocity, centre)) * h
            x = x + noise * math.sqrt(h) * rng.standard_normal(x.shape)
            t += h
        out.append(x.copy())
    return np.stack(out, 1)


def test_exact_sampler_solves_the_stated_sde():
    image = np.zeros((28, 28))
    image[5:20, 8:12] = 1.0  # a bar: rotation is visible
    image[5:8, 8:22] = 2.0
    times = np.linspace(0, 2, 5)
    kw = dict(omega=0.9, velocity=(0.7, -0.3), centre=(-1.0, 0.5))
    # noise off: the paths are the drift's flow, point by point
    exact = simulate_digit(image, 50, times, seed=3, noise=0.0, **kw)
    em = euler_maruyama(exact[:, 0], times, noise=0.0, rng=np.random.default_rng(0), **kw)
    np.testing.assert_allclose(exact, em, atol=1e-5)
    # noise on: around the flow of the same start, X_t - flow_t = R(omega t) noise B_t with B a
    # Brownian motion (rotating dW gives another one): covariance noise^2 min(t1, t2) R(omega (t1 - t2))
    noisy = simulate_digit(image, 100_000, times, seed=4, noise=0.2, **kw)
    resid = noisy - simulate_digit(image, 100_000, times, seed=4, noise=0.0, **kw)
    np.testing.assert_allclose(resid[:, 0], 0.0, atol=1e-12)
    for i, j in [(1, 1), (4, 4), (2, 4), (1, 3)]:
        cov = resid[:, i].T @ resid[:, j] / len(resid)
        a = kw["omega"] * (times[i] - times[j])
        want = 0.04 * min(times[i], times[j]) * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        np.testing.assert_allclose(cov, want, atol=0.004 * max(times[i], times[j]))


def test_data_module_one_point_per_person(mnist_root):
    dm = DigitSnapshots(root=str(mnist_root), digit=3, people_per_time=300, n_eval=100)
    assert dm.observed == [0, 2, 4, 6, 8] and dm.held_out == [1, 3, 5, 7]
    assert dm.people == 1500 and dm.truth.shape == (100, 9, 2)
    assert all(x.shape == (300, 2) for x in dm.snapshots.values())
    # the population's centre slides from (-1, 0) to (1, 0): the mean follows c0 + v t + R (m0 - c0)
    m0 = dm.truth[:, 0].mean(0) + np.array([1.0, 0.0])
    for s, t in enumerate(dm.times):
        c, si = math.cos(math.pi / 4 * t), math.sin(math.pi / 4 * t)
        want = np.array([-1.0 + t, 0.0]) + np.array([c * m0[0] - si * m0[1], si * m0[0] + c * m0[1]])
        np.testing.assert_allclose(dm.truth[:, s].mean(0), want, atol=0.05)
    traj = DigitSnapshots(root=str(mnist_root), people_per_time=300, n_eval=10, adjacency="trajectory")
    assert traj.people == 300


def test_bad_input(mnist_root, tmp_path):
    with pytest.raises(DataError, match="data.root"):
        DigitSnapshots(root=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="digit"):
        DigitSnapshots(root=str(mnist_root), digit=11)
    with pytest.raises(ValueError, match="adjacency"):
        DigitSnapshots(root=str(mnist_root), people_per_time=10, adjacency="household")
