"""rho_a = pi / Delta_a (Ghosts of Softmax) against independent computations: the JVP against
central finite differences of the logits, and rho_a against the place where the Taylor
partial sums of the model's own loss stop converging (coefficients from power-series
arithmetic on finite-difference logit slopes, the loss from plain forwards)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regularizers import directional_logits, logit_spread, softmax_radius



@pytest.fixture(autouse=True)
def _float64():
    """Finite differences and 220-term series want float64 models."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _fd_slopes(model, x, u, eps=1e-6):
    """Central finite difference of the logits along u (a dict of unit-norm tangents)."""
    base = {n: p.detach().clone() for n, p in model.named_parameters()}

    def logits_at(sign):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + sign * eps * u[n])
            return model(x).clone()

    a = (logits_at(1) - logits_at(-1)) / (2 * eps)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])
    return a


def _unit(model, gen):
    d = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in d.values()))
    return {n: v / norm for n, v in d.items()}


def test_directional_derivatives_equal_finite_differences_of_the_logits():
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    x = torch.randn(9, 5, generator=gen)
    u = _unit(model, gen)
    z, a = directional_logits(model, x, u)
    torch.testing.assert_close(z, model(x))
    torch.testing.assert_close(a, _fd_slopes(model, x, u), rtol=1e-6, atol=1e-8)
    spread = logit_spread(a)
    assert spread.shape == (9,)
    torch.testing.assert_close(spread, a.max(1).values - a.min(1).values)


def _taylor_coefficients(z, a, y, n_terms):
    """Coefficients c_n of CE(t) = log sum_k exp(z_k + a_k t) - z_y - a_y t per row, by
    power-series arithmetic: Z(t)/Z(0) = sum_k w_k exp(a_k t), then log by the recurrence
    n L_n = n Z_n - sum_{k<n} k L_k Z_{n-k}."""
    w = np.exp(z - z.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    Z, term = np.ones((len(z), n_terms)), w.copy()  # Z_0 = 1; term = w a^n / n!
    for n in range(1, n_terms):
        term = term * a / n
        Z[:, n] = term.sum(1)
    L = np.zeros_like(Z)
    for n in range(1, n_terms):
        L[:, n] = Z[:, n] - sum(k * L[:, k] * Z[:, n - k] for k in range(1, n)) / n
    rows = np.arange(len(z))
    L[:, 0] = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[rows, y]
    L[:, 1] -= a[rows, y]
    return L


def _breakdown_radius(model, x, y, u, scale):
    """Smallest step t (in units of ``scale``) where the Taylor partial sums of the batch
    loss, evaluated against the model's real loss at theta + t u, diverge: orders 200-220 err
    more than orders 20-30 (near the radius the error of order N falls like 1/N only, which
    puts the detected point at most ~2% outside it)."""
    a = _fd_slopes(model, x, u).numpy() * scale  # slopes per unit of t / scale
    with torch.no_grad():
        z = model(x).numpy()
    c = _taylor_coefficients(z, a, y.numpy(), 221)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in np.arange(0.5, 2.0, 0.01):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + s * scale * u[n])
            true = F.cross_entropy(model(x), y, reduction="none").numpy()
        partial = np.cumsum(c * s ** np.arange(c.shape[1]), 1)
        err = np.abs(partial - true[:, None]).mean(0)  # the batch loss is the row mean
        if err[200:221].max() > err[20:31].max() and err[200:221].max() > 1e-9:
            break
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])
    return s * scale


def test_radius_is_where_the_taylor_model_breaks_down_for_tied_logits():
    # two classes, logits tied at the start (zero weights): the nearest ghost is exactly at
    # distance pi / Delta (zeros of e^{a0 t} + e^{a1 t} at t = i pi (2n+1) / (a1 - a0))
    gen = torch.Generator().manual_seed(1)
    model = nn.Linear(6, 2)
    nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    u = _unit(model, gen)
    tau = 3.0
    rad = softmax_radius(model, x, {n: tau * v for n, v in u.items()})
    assert rad.tau == pytest.approx(tau)
    assert rad.r == pytest.approx(tau / rad.rho)
    found = _breakdown_radius(model, x, y, u, rad.rho)
    assert rad.rho <= found <= 1.03 * rad.rho


def test_radius_is_a_lower_bound_on_the_breakdown_for_spread_logits():
    # ten classes at random logits: the series converges at least out to rho_a
    gen = torch.Generator().manual_seed(2)
    model = nn.Linear(6, 10)
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    u = _unit(model, gen)
    rad = softmax_radius(model, x, u)
    found = _breakdown_radius(model, x, y, u, rad.rho)
    assert found >= 0.99 * rad.rho
    assert found < 2.0 * rad.rho  # and the bound is not vacuous here


def test_batchnorm_buffers_and_training_flags_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    delta = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    rad = softmax_radius(model, torch.randn(5, 4), delta)
    assert rad.rho > 0 and math.isfinite(rad.rho)
    assert all(m.training for m in model.modules())
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, before[n])


def test_bad_input_names_the_problem():
    model = nn.Linear(3, 2)
    with pytest.raises(KeyError, match="not parameters"):
        directional_logits(model, torch.randn(2, 3), {"nope": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="delta is empty"):
        softmax_radius(model, torch.randn(2, 3), {})
    with pytest.raises(ValueError, match="non-finite"):
        softmax_radius(model, torch.randn(2, 3), {"weight": torch.full((2, 3), float("inf"))})
    zero = softmax_radius(model, torch.randn(2, 3), {"weight": torch.zeros(2, 3)})
    assert zero.rho == math.inf and zero.r == 0.0
