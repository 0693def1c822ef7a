"""Langevin noise for any optimizer: theta <- theta + sqrt(2 * lr * T) * xi. Pure torch.

Unadjusted Langevin / noisy gradient descent (and its mean-field form, MFLD):
theta_{t+1} = theta_t - lr * grad L(theta_t) + sqrt(2 * lr * T) * xi_t, xi_t ~ N(0, I),
whose stationary law approximates the Gibbs measure exp(-L(theta) / T). Adding the noise
after the optimizer's own step, with each param group's lr, makes any optimizer's update
the drift ("Improved high-dimensional estimation with Langevin dynamics and stochastic
weight averaging" pairs it with iterate averaging).
"""
from __future__ import annotations

import math

import torch
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from optimizers.sharded import is_dtensor


@torch.no_grad()
def add_langevin_noise_(param_groups, temperature: float, generator: torch.Generator) -> None:
    """Add sqrt(2 * group["lr"] * temperature) * N(0, I) to every parameter of every group,
    in place, drawing from ``generator`` (whose device must be the parameters'). FSDP2
    (DTensor) parameters get the rows of the noise one process would add."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    for group in param_groups:
        lr = float(group["lr"])
        if lr < 0:
            raise ValueError(f"param group lr={lr} is negative")
        std = math.sqrt(2.0 * lr * temperature)
        if std == 0.0:
            continue
        for p in group["params"]:
            xi = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            if is_dtensor(p):
                # FSDP2: every rank draws the whole tensor (one stream, as one process) and
                # adds the block it holds
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh,
                                                                      p.placements)
                block = tuple(slice(o, o + n) for o, n in zip(offset, shape))
                p.to_local().add_(xi[block], alpha=std)
            else:
                p.add_(xi, alpha=std)


def tangent(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v`` projected onto the tangent space of the sphere at each row of ``w`` (unit rows):
    v - <v, w> w, the Riemannian gradient / tangent noise of spherical Langevin dynamics."""
    return v - (v * w).sum(-1, keepdim=True) * w


def retract(w: torch.Tensor) -> torch.Tensor:
    """Each row of ``w`` scaled back onto the unit sphere (the projection retraction)."""
    return w / w.norm(dim=-1, keepdim=True)


def spherical_langevin_step(w: torch.Tensor, grad: torch.Tensor, lr: float, temperature: float,
                            xi: torch.Tensor) -> torch.Tensor:
    """One step of spherical Langevin dynamics on the unit sphere (rows of ``w``: independent
    chains), as Wei, Damian & Lee (arXiv 2603.06028) run it on S^{d-1}: a Riemannian gradient
    step, retraction, then sqrt(2 lr T) of tangent Gaussian noise ``xi`` and retraction again.
    The two retractions are what the Lightning path does (the optimizer step, the module's
    retraction hook, then ``LangevinNoise(manifold="sphere")``); they differ from a single
    retraction by O(lr^2)."""
    w = retract(w - lr * tangent(w, grad))
    # ** 0.5, not math.sqrt: lr and temperature may be per-chain tensors of shape (..., 1)
    return retract(w + (2.0 * lr * temperature) ** 0.5 * tangent(w, xi))


@torch.no_grad()
def add_sphere_noise_(param_groups, temperature: float, generator: torch.Generator) -> None:
    """Spherical :func:`add_langevin_noise_`: each parameter, flattened, is a point on the
    sphere of its current norm; the noise is drawn in its tangent space and the result is
    scaled back to that norm."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    for group in param_groups:
        std = math.sqrt(2.0 * float(group["lr"]) * temperature)
        if std == 0.0:
            continue
        for p in group["params"]:
            xi = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            flat, r = p.reshape(1, -1), p.norm()
            moved = retract(flat + std * tangent(flat / r, xi.reshape(1, -1))) * r
            p.copy_(moved.reshape(p.shape))
