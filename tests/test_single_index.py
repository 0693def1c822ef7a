"""Single-index data, spherical Langevin dynamics and the averaged estimator (arXiv 2603.06028)."""
from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import numpy as np
import pytest
import scipy.special
import torch
from numpy.polynomial import hermite_e

from regularizers import IterateAveraging, LangevinNoise
from regularizers.langevin.core import add_sphere_noise_, retract, spherical_langevin_step
from scripts.papers.langevin_swa.single_index import correlation_grad, langevin_chains
from toolkit.data import SingleIndexDataModule
from toolkit.data.single_index import hermite, hermite_grad, hidden_direction, single_index_samples
from toolkit.modules import SingleIndex
from toolkit.seeding import generator


@pytest.mark.parametrize("k", range(0, 8))
def test_hermite_matches_numpy_and_scipy(k):
    z = np.linspace(-4, 4, 101)
    want = hermite_e.hermeval(z, [0] * k + [1]) / math.sqrt(math.factorial(k))
    got = hermite(k, torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, scipy.special.eval_hermitenorm(k, z) / math.sqrt(math.factorial(k)),
                               rtol=1e-10, atol=1e-10)
    dwant = hermite_e.hermeval(z, hermite_e.hermeder([0] * k + [1])) / math.sqrt(math.factorial(k))
    np.testing.assert_allclose(hermite_grad(k, torch.from_numpy(z)).numpy(), dwant, rtol=1e-12, atol=1e-10)


def test_hermite_orthonormal_under_gaussian():
    # Gauss-HermiteE quadrature (weight exp(-z^2/2)) is exact for these degrees
    z, w = hermite_e.hermegauss(20)
    w = w / w.sum()
    H = np.stack([hermite(k, torch.from_numpy(z)).numpy() for k in range(6)])
    np.testing.assert_allclose((H * w) @ H.T, np.eye(6), atol=1e-12)


def test_data_module_draws_the_model_reproducibly():
    dm = SingleIndexDataModule(dim=8, k=3, n=64, val_size=32, seed=3)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    assert x.shape == (64, 8) and abs(dm.theta_star.norm().item() - 1) < 1e-6
    torch.testing.assert_close(y, hermite(3, x @ dm.theta_star))
    again = SingleIndexDataModule(dim=8, k=3, n=64, val_size=32, seed=3)
    again.setup("fit")
    assert torch.equal(again.train_set.tensors[0], x)
    other = SingleIndexDataModule(dim=8, k=3, n=64, val_size=32, seed=4)
    assert not torch.allclose(other.theta_star, dm.theta_star)
    assert not torch.equal(dm.val_set.tensors[0][:32], x[:32])  # fresh validation samples
    assert len(list(dm.train_dataloader())) == 1  # full batch by default


@pytest.mark.parametrize("bad", [dict(k=0), dict(k=-1), dict(dim=1), dict(batch_size=100, n=10)])
def test_bad_data_values_fail_at_construction(bad):
    with pytest.raises(ValueError, match="k=|dim=|batch_size"):
        SingleIndexDataModule(**bad)


def test_bad_model_and_noise_values_fail_at_construction():
    with pytest.raises(ValueError, match="integer >= 1"):
        SingleIndex(k=0)
    for T in (0.0, -1e-3):
        with pytest.raises(ValueError, match="drop the LangevinNoise callback"):
            LangevinNoise(temperature=T)
    with pytest.raises(ValueError, match="manifold"):
        LangevinNoise(temperature=1e-3, manifold="torus")


def _naive_step(w, grad, lr, T, xi):
    """Float64 transcription, one chain: Riemannian step, retract, tangent noise, retract."""
    g = grad - (grad @ w) * w
    w = w - lr * g
    w = w / np.linalg.norm(w)
    xt = xi - (xi @ w) * w
    w = w + math.sqrt(2 * lr * T) * xt
    return w / np.linalg.norm(w)


def test_dynamics_core_matches_a_naive_loop():
    k, d, n, S, steps, lr, T = 3, 6, 40, 3, 25, 0.05, 0.02
    theta = torch.stack([hidden_direction(d, s) for s in range(S)]).double()
    data = [single_index_samples(n, theta[s].float(), k, s) for s in range(S)]
    X = torch.stack([x for x, _ in data]).double()
    Y = torch.stack([y for _, y in data]).double()
    g = torch.Generator().manual_seed(0)
    w0 = retract(torch.randn(S, 1, d, generator=g, dtype=torch.float64))
    xis = torch.randn(steps, S, 1, d, generator=g, dtype=torch.float64)
    w, ws = w0, []
    for t in range(steps):
        w = spherical_langevin_step(w, correlation_grad(X, Y, w, k), lr, T, xis[t])
        ws.append(w)
    for s in range(S):
        v = w0[s, 0].numpy()
        xs, ys = X[s].numpy(), Y[s].numpy()
        for t in range(steps):
            grad = sum(-ys[i] * math.sqrt(k) * hermite_e.hermeval(xs[i] @ v, [0, 0, 1]) / math.sqrt(2)
                       * xs[i] for i in range(n)) / n  # h_3' = sqrt(3) h_2, h_2 = He_2 / sqrt(2)
            v = _naive_step(v, grad, lr, T, xis[t, s, 0].numpy())
            assert abs(np.linalg.norm(ws[t][s, 0].numpy()) - 1) < 1e-12  # on the sphere
        np.testing.assert_allclose(w[s, 0].numpy(), v, atol=1e-10)


def test_correlation_grad_is_the_autograd_gradient():
    X, Y = torch.randn(2, 30, 5, dtype=torch.float64), torch.randn(2, 30, dtype=torch.float64)
    w = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    loss = -(Y[:, None, :] * hermite(4, torch.einsum("snd,sbd->sbn", X, w))).mean(-1).sum()
    loss.backward()
    torch.testing.assert_close(correlation_grad(X, Y, w.detach(), 4), w.grad)


def test_sphere_noise_is_tangent_and_keeps_the_norm():
    p = torch.nn.Parameter(torch.randn(3, 4) * 2)
    r = p.norm().item()
    before = p.detach().clone()
    add_sphere_noise_([{"params": [p], "lr": 0.1}], 0.01, torch.Generator().manual_seed(0))
    assert abs(p.norm().item() - r) < 1e-5
    xi = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).flatten()
    u = before.flatten() / r
    want = retract((before.flatten() + math.sqrt(2 * 0.1 * 0.01) * (xi - (xi @ u) * u))[None])[0] * r
    torch.testing.assert_close(p.detach().flatten(), want)


class Iterates(L.Callback):
    def __init__(self):
        self.ws = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ws.append(pl_module.w.detach().clone())


def test_lightning_path_is_the_functional_core_and_averages_on_the_sphere():
    """SingleIndex + LangevinNoise(sphere) + IterateAveraging through a Trainer reproduce
    spherical_langevin_step with the callback's noise stream; iterates stay on the sphere and
    the fitted direction is the renormalized mean of the iterates after the burn-in."""
    d, k, n, steps, lr, T, start = 8, 3, 64, 12, 0.2, 0.01, 4
    torch.manual_seed(0)
    model = SingleIndex(dim=d, k=k, optimizer="sgd", lr=lr, optimizer_kwargs={"momentum": 0.0})
    w0 = model.w.detach().clone()
    dm = SingleIndexDataModule(dim=d, k=k, n=n, val_size=16, seed=1)
    rec = Iterates()
    L.Trainer(max_steps=steps, callbacks=[LangevinNoise(temperature=T, seed=7, manifold="sphere"),
                                          IterateAveraging(start_step=start), rec],
              logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0).fit(model, dm)
    x, y = dm.train_set.tensors
    w, want = w0[None], []
    for t in range(steps):
        xi = torch.randn(d, generator=generator(7, t))[None]
        w = spherical_langevin_step(w, correlation_grad(x[None], y[None], w[None], k)[0], lr, T, xi)
        want.append(w[0])
    for got, ref in zip(rec.ws, want):
        assert abs(got.norm().item() - 1) < 1e-5
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    avg = torch.stack(want[start:]).mean(0)
    torch.testing.assert_close(model.w.detach(), avg, atol=1e-5, rtol=1e-5)  # copied in at fit end
    torch.testing.assert_close(model.direction().detach(), avg / avg.norm(), atol=1e-5, rtol=1e-5)
    assert model.w.norm() < 0.999  # the average of distinct unit vectors is shorter


@pytest.mark.slow
def test_averaging_beats_the_last_iterate_once_the_chain_is_near_theta_star():
    """Above the sample threshold (d=16, n=4096, k*=3) both estimators find theta*; the
    average removes the thermal spread around it that the last iterate keeps."""
    k, d, n, S = 3, 16, 4096, 10
    theta = torch.stack([hidden_direction(d, s) for s in range(S)])
    data = [single_index_samples(n, theta[s], k, s) for s in range(S)]
    X, Y = torch.stack([x for x, _ in data]), torch.stack([y for _, y in data])
    T = torch.tensor(1 / 16.0)
    g = torch.Generator().manual_seed(0)
    w0 = retract(torch.randn(S, 1, d, generator=g))
    last, m1, _ = langevin_chains(X, Y, k, 0.05 / (T * d), T, steps=600, w0=w0, g=g)
    ov = lambda v: (retract(v)[:, 0] * theta).sum(-1).abs()
    assert ov(m1).median() > 0.8
    assert ov(m1).median() > ov(last).median() + 0.05


def _fit_single_index(steps, root, ckpt=None):
    torch.manual_seed(0)
    model = SingleIndex(dim=8, k=3, optimizer="sgd", lr=0.2, optimizer_kwargs={"momentum": 0.0})
    dm = SingleIndexDataModule(dim=8, k=3, n=64, batch_size=16, val_size=16, seed=1)
    cbs = [LangevinNoise(temperature=0.01, seed=7, manifold="sphere"), IterateAveraging(start_step=2),
           ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=6, save_top_k=-1)]
    L.Trainer(max_steps=steps, callbacks=cbs, logger=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              default_root_dir=root).fit(model, dm, ckpt_path=ckpt)
    return model


def test_resume_mid_epoch_continues_data_noise_and_average(tmp_path):
    """4 minibatches an epoch; the checkpoint taken during training at step 6 (mid-epoch 2),
    resumed to step 10, gives the straight run's averaged direction: data order, noise
    stream, the current iterate and the running average all continue."""
    straight = _fit_single_index(10, tmp_path)
    resumed = _fit_single_index(10, tmp_path / "again", ckpt=str(tmp_path / "step=6.ckpt"))
    torch.testing.assert_close(resumed.w.detach(), straight.w.detach(), atol=1e-6, rtol=1e-6)
    assert straight.w.norm() < 0.999  # the average was copied in, not the last iterate
