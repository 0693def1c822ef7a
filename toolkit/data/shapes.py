"""Digit-shaped point clouds moved by a known drift: the shape data set of the private-trajectory
recipe, in the spirit of the synthesized hand-drawn MNIST data of Gu, Chien & Greenewald
(arXiv 2506.12203).

A person's starting point is drawn from one MNIST digit image read as a density (a pixel with
probability proportional to its intensity, then uniform within the pixel; the image spans
[-1, 1]^2 around ``centre``). The population then follows

    dX = b(X, t) dt + noise dW,   b(x, t) = v + omega J (x - c0 - v t),   J = [[0, -1], [1, 0]],

a rotation at angular speed ``omega`` about a centre moving at velocity ``v``: the digit turns
and slides rigidly while the Brownian term blurs it. The solution is exact,
X_t = c0 + v t + R(omega t) (X_0 - c0 + noise B_t) (rotating the Brownian increments gives
another Brownian motion), so paths are sampled without discretization error.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .idx import DataError, find_split, read_idx
from .sde import SDESnapshots


def digit_image(root: str | Path, digit: int = 2, which: int = 0) -> np.ndarray:
    """The ``which``-th image of class ``digit`` in MNIST's test split under ``root``: (28, 28) floats."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit={digit}: must be 0..9")
    images, labels = (read_idx(p) for p in find_split(Path(root), "t10k"))
    hits = np.flatnonzero(labels == digit)
    if not 0 <= which < len(hits):
        raise ValueError(f"which={which}: the test split holds {len(hits)} images of digit {digit}")
    return images[hits[which]].astype(np.float64)


def sample_digit(image: np.ndarray, n: int, rng: np.random.Generator, centre=(0.0, 0.0)) -> np.ndarray:
    """n points from the image read as a density on [-1, 1]^2 + centre (row 0 at the top): (n, 2)."""
    h, w = image.shape
    p = image.ravel() / image.sum()
    idx = rng.choice(h * w, size=n, p=p)
    row, col = np.divmod(idx, w)
    x = (col + rng.random(n)) / w * 2 - 1
    y = 1 - (row + rng.random(n)) / h * 2
    return np.stack([x, y], -1) + np.asarray(centre)


def digit_drift(x: np.ndarray, t: float, omega: float, velocity, centre) -> np.ndarray:
    """b(x, t) = v + omega J (x - c0 - v t): what the exact sampler integrates."""
    v = np.asarray(velocity)
    r = x - np.asarray(centre) - v * t
    return v + omega * np.stack([-r[..., 1], r[..., 0]], -1)


def simulate_digit(image: np.ndarray, n: int, times: np.ndarray, seed: int, omega: float = math.pi / 4,
                   velocity=(1.0, 0.0), centre=(-1.0, 0.0), noise: float = 0.03) -> np.ndarray:
    """n exact paths of the rotating, sliding digit recorded at ``times``: (n, len(times), 2)."""
    rng = np.random.default_rng(seed)
    c0, v = np.asarray(centre), np.asarray(velocity)
    x0 = sample_digit(image, n, rng, centre)
    out = np.empty((n, len(times), 2))
    brown, t_prev = np.zeros((n, 2)), 0.0
    for s, t in enumerate(times):
        brown = brown + math.sqrt(t - t_prev) * rng.standard_normal((n, 2))
        t_prev = t
        c, si = math.cos(omega * t), math.sin(omega * t)
        r = x0 - c0 + noise * brown
        out[:, s] = c0 + v * t + np.stack([c * r[:, 0] - si * r[:, 1], si * r[:, 0] + c * r[:, 1]], -1)
    return out


class DigitSnapshots(SDESnapshots):
    """Snapshots of a digit-shaped population (``simulate_digit``) at ``n_times`` times in
    [0, t_end], every ``observe_every``-th observed, the rest held out; otherwise as
    ``SDESnapshots`` (``adjacency`` "point": independent people per time, one point each)."""

    def __init__(self, root: str = "../shared/data/mnist", digit: int = 2, which: int = 0,
                 people_per_time: int = 2000, n_times: int = 9, t_end: float = 2.0,
                 observe_every: int = 2, adjacency: str = "point", n_eval: int = 500, seed: int = 0,
                 omega: float = math.pi / 4, noise: float = 0.03):
        if not Path(root).is_dir():
            raise DataError(f"MNIST folder {root} does not exist: set data.root to the folder "
                            f"holding the four MNIST IDX files")
        self.image = digit_image(root, digit, which)
        self.motion = dict(omega=omega, noise=noise)
        super().__init__(people_per_time, n_times, t_end, observe_every, adjacency, n_eval, seed)

    def simulate(self, n: int, times: np.ndarray, seed: int) -> np.ndarray:
        return simulate_digit(self.image, n, times, seed, **self.motion)
