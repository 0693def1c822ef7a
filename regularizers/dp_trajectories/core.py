"""Private synthetic trajectories by mean-field Langevin dynamics (MFLD), after Gu, Chien &
Greenewald, "Private Continuous-Time Synthetic Trajectory Generation via Mean-Field Langevin
Dynamics" (arXiv 2506.12203). Pure torch + POT; ``toolkit.modules.trajectories`` wraps it.

Particles z_p(t_s), p = 1..N, s = 1..S (all times: observed and held-out) represent the
synthetic population mu_s = (1/N) sum_p delta_{z_p(t_s)}. Objective over the path of measures:

    L = sum_{s observed} MMD_k^2(mu_s, data_s)  +  lam * sum_s W_reg(mu_s, mu_{s+1}) / (t_{s+1} - t_s)

with k a sum of Gaussian kernels and POT's entropic OT cost W_reg (``ot.sinkhorn2``, torch
backend). MFLD: z <- z - eta * grad(dL/dmu)(z) + sqrt(2 eta tau) xi (Langevin noise at
temperature tau is the mean-field entropy term). The data enter only through
-(1/n_s) sum_j grad_z k(x_j, z), a sum of per-person vectors a_j (over all N particles); each is
clipped to norm C and the sum gets Gaussian noise of std sigma * C_person before dividing by
n_s, which is DP-SGD's full-batch Gaussian mechanism per step (sampling rate 1):

- one point per person (the paper's setting): a person is in one snapshot's sum only, so the
  step's release (all snapshots) has add/remove sensitivity C;
- whole trajectory per person (baseline): a person is in every observed snapshot, sensitivity
  sqrt(#observed) * C, so the same epsilon needs sqrt(#observed) times the noise.
"""
from __future__ import annotations

import math

import numpy as np
import ot
import torch


def rotating_drift(x: np.ndarray, omega: float = 2.0, gamma: float = 1.0) -> np.ndarray:
    """Rotation at angular speed ``omega`` plus attraction to the unit circle (a limit cycle)."""
    r2 = (x ** 2).sum(-1, keepdims=True)
    return omega * np.stack([-x[..., 1], x[..., 0]], -1) - gamma * (r2 - 1.0) * x


def simulate(n: int, times: np.ndarray, seed: int, noise: float = 0.15, dt: float = 0.005,
             x0=(1.5, 0.0), x0_std: float = 0.2) -> np.ndarray:
    """n Euler-Maruyama paths of dX = b(X) dt + noise dW, recorded at ``times``: (n, len(times), 2)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x0) + x0_std * rng.standard_normal((n, 2))
    out, t = np.empty((n, len(times), 2)), 0.0
    for s, target in enumerate(times):
        while t < target - 1e-12:
            h = min(dt, target - t)
            x = x + rotating_drift(x) * h + noise * math.sqrt(h) * rng.standard_normal(x.shape)
            t += h
        out[:, s] = x
    return out


BANDWIDTHS = (0.2, 0.5, 1.0)  # local fit plus long-range pull


def kernel_grad(z: torch.Tensor, x: torch.Tensor, hs=BANDWIDTHS) -> torch.Tensor:
    """grad_z k(z, x) for all pairs: (len(z), len(x), d), k(z, x) = sum_h h^2 exp(-|z-x|^2/2h^2).
    The h^2 weights give every scale the same curvature (1 at z = x), so one step size suits
    all of them; |grad_z k| <= sum_h h e^(-1/2)."""
    diff = z[:, None, :] - x[None, :, :]
    d2 = diff.square().sum(-1, keepdim=True)
    return -diff * sum(torch.exp(-d2 / (2 * h * h)) for h in hs)


def person_gradients(x: torch.Tensor, z: torch.Tensor, hs=BANDWIDTHS) -> torch.Tensor:
    """a_j = -grad_z k(z_p, x_j) for every person j and particle p: (n, N, d). The data term's
    first-variation gradient at z_p is (1/n) sum_j a_j[p]; per particle |a_j[p]| <=
    sum_h h e^(-1/2), so ||a_j|| <= sqrt(N) sum_h h e^(-1/2) even before clipping."""
    return -kernel_grad(z, x, hs).transpose(0, 1)


def clipped_sum(a: torch.Tensor, clip: float) -> torch.Tensor:
    """sum_j a_j min(1, C / ||a_j||): each person's whole (N, d) contribution clipped to C."""
    norms = a.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (a * (clip / norms).clamp(max=1.0)[:, None, None]).sum(0)


def clipped_kernel_sum(x: torch.Tensor, z: torch.Tensor, clip: float, hs=BANDWIDTHS) -> torch.Tensor:
    """``clipped_sum(person_gradients(x, z), clip)`` without the (n, N, d) tensor: with
    K_jp = sum_h exp(-|z_p - x_j|^2 / 2h^2), a_j[p] = (z_p - x_j) K_jp, so
    ||a_j||^2 = sum_p |z_p - x_j|^2 K_jp^2 and, with w_j the clip factor,
    sum_j w_j a_j[p] = z_p (K^T w)_p - ((K w)^T x)_p: two matrix products."""
    d2 = torch.cdist(x, z).square()
    K = sum(torch.exp(-d2 / (2 * h * h)) for h in hs)
    w = (clip / (d2 * K.square()).sum(1).sqrt().clamp_min(1e-12)).clamp(max=1.0)
    wK = K * w[:, None]
    return z * wK.sum(0)[:, None] - wK.T @ x


def smooth_gradient(Z: torch.Tensor, times: torch.Tensor, observed: list[int], path_weight: float,
                    reg: float, hs=BANDWIDTHS) -> torch.Tensor:
    """First-variation gradient (per particle) of the data-free part of L: the MMD
    self-interaction (1/2) int int k dmu dmu at observed times, and the entropic path energy
    between consecutive times, whose gradient at z_p is 2 (z_p - T(z_p)) / dt with T the
    barycentric map of the Sinkhorn plan (``ot.sinkhorn``, envelope theorem)."""
    N = Z.shape[0]
    grad = torch.zeros_like(Z)
    for s in observed:
        grad[:, s] += kernel_grad(Z[:, s], Z[:, s], hs).mean(1)
    w = np.full(N, 1.0 / N)
    for s in range(Z.shape[1] - 1):
        a, b = Z[:, s], Z[:, s + 1]
        M = torch.cdist(a, b).square().numpy()
        # numpy backend: for 64 x 64 plans it is ~10x faster than POT's torch backend, and the
        # plan needs no autograd (envelope theorem)
        plan = torch.from_numpy(N * ot.sinkhorn(w, w, M / M.mean(), reg, numItermax=100, warn=False))
        scale = 2 * path_weight / (times[s + 1] - times[s])
        grad[:, s] += scale * (a - plan @ b)
        grad[:, s + 1] += scale * (b - plan.T @ a)
    return grad


def kernel_bound(n_particles: int, hs=BANDWIDTHS) -> float:
    """sup ||a_j||: a clip at this norm never binds (the kernel bounds each person already)."""
    return math.sqrt(n_particles) * sum(h * math.exp(-0.5) for h in hs)


def person_sensitivity(clip: float, adjacency: str, n_observed: int) -> float:
    """Add/remove L2 sensitivity of one step's clipped sums (all snapshots together)."""
    if adjacency == "point":
        return clip
    if adjacency == "trajectory":
        return clip * math.sqrt(n_observed)
    raise ValueError(f"adjacency={adjacency!r}: choose 'point' (one point per person) or "
                     f"'trajectory' (a person's whole path)")


def mfld_gradient(Z: torch.Tensor, data: dict[int, torch.Tensor], times: torch.Tensor, *,
                  clip: float, noise_std: float, path_weight: float, reg: float,
                  generator: torch.Generator, counts: dict[int, float] | None = None) -> torch.Tensor:
    """The privatized first-variation gradient at every particle: (N, S, d).

    ``noise_std`` is the std of the Gaussian added to each snapshot's clipped sum (sigma times
    the person sensitivity); the data term's first variation is that sum / n_s, with n_s the
    public ``counts[s]`` (under add/remove adjacency the true count is private, as DP-SGD
    divides by the expected batch size); without ``counts`` the true sizes are used.
    """
    grad = smooth_gradient(Z, times, sorted(data), path_weight, reg)
    for s, x in data.items():
        total = clipped_kernel_sum(x, Z[:, s], clip)
        if noise_std > 0:
            total = total + noise_std * torch.randn(total.shape, generator=generator, dtype=Z.dtype)
        grad[:, s] += total / (counts[s] if counts is not None else len(x))
    return grad


def mfld_step(Z: torch.Tensor, data: dict[int, torch.Tensor], times: torch.Tensor, *, clip: float,
              noise_std: float, lr: float, temperature: float, path_weight: float, reg: float,
              generator: torch.Generator, counts: dict[int, float] | None = None) -> torch.Tensor:
    """One MFLD step: Z - lr * (private gradient) + sqrt(2 lr tau) xi; returns the new Z."""
    grad = mfld_gradient(Z, data, times, clip=clip, noise_std=noise_std, path_weight=path_weight,
                         reg=reg, generator=generator, counts=counts)
    new = Z - lr * grad
    if temperature > 0:
        new = new + math.sqrt(2 * lr * temperature) * torch.randn(Z.shape, generator=generator, dtype=Z.dtype)
    return new


def w2(a: np.ndarray, b: np.ndarray) -> float:
    """Exact W2 between two uniform point clouds (``ot.emd2``)."""
    return float(math.sqrt(max(ot.emd2(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)),
                                       ot.dist(a, b), numItermax=1_000_000), 0.0)))


def generate(data: dict[int, torch.Tensor], times: torch.Tensor, *, n_particles: int, steps: int,
             lr: float, temperature: float, path_weight: float, reg: float, clip: float,
             noise_std: float, seed: int, counts: dict[int, float] | None = None,
             on_step=None) -> torch.Tensor:
    """``steps`` MFLD steps from a data-independent start N(0, I): particles (N, S, d)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n_particles, len(times), 2, generator=g, dtype=torch.float64)
    for step in range(steps):
        Z = mfld_step(Z, data, times, clip=clip, noise_std=noise_std, lr=lr, temperature=temperature,
                      path_weight=path_weight, reg=reg, generator=g, counts=counts)
        if on_step is not None:
            on_step(step, Z)
    return Z
