"""HyperSphere (HyperP), Muon++ and AuON: the property each paper's update is built for."""
import math

import pytest
import torch

import optimizers
from optimizers import AuON, HybridAuON, HyperSphere, MuonPlusPlus, param_groups
from optimizers.auon import auon_normalize
from optimizers.hyperp import infer_depth
from optimizers.muonpp import hidden_spectral_ratios
from optimizers.orientation import spectral_scale
from optimizers.newton_schulz import orthogonalize
from tests.test_optimizers_muon import tiny_gpt, train


def hidden(model):
    return {n: p for g in param_groups(model) if g["use_muon"]
            for n, p in zip(g["param_names"], g["params"])}


def test_hyperp_keeps_frobenius_norms_and_steps_relative_lr():
    model = tiny_gpt(depth_mup=True)
    norms = {n: p.norm().item() for n, p in hidden(model).items()}
    opt = optimizers.build_optimizer(model, "hyperp", lr=0.05, weight_decay=0.1, adam_lr=1e-2)
    before = {n: p.detach().clone() for n, p in hidden(model).items()}
    train(model, opt, 1)
    for n, p in hidden(model).items():
        # one step moves W by lr relative to its norm, up to the retraction's second order
        rel = (p.detach() - before[n]).norm().item() / norms[n]
        assert rel == pytest.approx(0.05, rel=0.03), n
    train(model, opt, 5, start=1)
    for n, p in hidden(model).items():
        assert p.norm().item() == pytest.approx(norms[n], rel=1e-5), n


def test_hyperp_mup_radius_makes_the_spectral_step_width_independent():
    """radius_scale=c: every hidden matrix sits on ||W||_F = c*sqrt(fan_out) after its first
    step and stays there, a step moves it by lr*c*sqrt(fan_out) in Frobenius norm, and its
    spectral norm is about the same at width 32 and 128; with the initial (std 0.02) norms it
    grows like sqrt(width)."""
    c, lr = 0.25, 0.05
    step_norm = {}
    for radius in (c, None):
        for width in (32, 128):
            model = tiny_gpt(n_embd=width, depth_mup=True)
            opt = optimizers.build_optimizer(model, "hyperp", lr=lr, adam_lr=1e-2,
                                             radius_scale=radius)
            w = hidden(model)["blocks.0.attn.c_proj.weight"]
            train(model, opt, 1)  # the first step also moves W onto the sphere
            before = w.detach().clone()
            train(model, opt, 1, start=1)
            step_norm[radius, width] = torch.linalg.matrix_norm(w.detach() - before, 2).item()
            if radius is not None:  # the relative step is lr on the muP sphere
                fro = (w.detach() - before).norm().item()
                assert fro == pytest.approx(lr * c * math.sqrt(w.shape[0]), rel=0.03)
            train(model, opt, 2, start=2)
            if radius is not None:
                for n, p in hidden(model).items():
                    assert p.norm().item() == pytest.approx(c * math.sqrt(p.shape[0]), rel=1e-5), n
    # Newton-Schulz leaves singular values in a band (and a 64-token batch's momentum is
    # not full rank), so the spectral steps agree to ~30%, against sqrt(128/32) = 2x more
    # drift with the initial norms.
    mup, init = (step_norm[r, 128] / step_norm[r, 32] for r in (c, None))
    assert mup == pytest.approx(1.0, rel=0.35)
    assert init / mup == pytest.approx(2.0, rel=0.15)
    with pytest.raises(ValueError, match="radius_scale"):
        HyperSphere(param_groups(tiny_gpt()), radius_scale=0.0)


def test_hyperp_weight_decay_changes_nothing():
    """Exact to float rounding for one step; over more steps the bf16 Newton-Schulz turns
    1e-7 weight differences into ~1% ones, so the loss curve is compared to that noise."""
    from tests.test_optimizers_muon import lm_loss
    for steps, tol in ((1, 1e-6), (6, 0.02)):
        runs = []
        for wd in (0.0, 0.5):
            model = tiny_gpt(depth_mup=True)
            groups = [{**g, "weight_decay": wd if g["use_muon"] else 0.0}
                      for g in param_groups(model)]
            opt = HyperSphere(groups, lr=0.05, adam_lr=1e-2)
            losses = []
            for s in range(steps):
                opt.zero_grad()
                loss = lm_loss(model, s)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            runs.append((model, losses + [lm_loss(model, steps).item()]))
        (a, la), (b, lb) = runs
        if steps == 1:
            for (n, p), q in zip(a.named_parameters(), b.parameters()):
                torch.testing.assert_close(p, q, rtol=0, atol=tol * p.abs().max().item(), msg=n)
        assert la == pytest.approx(lb, rel=tol)
        start = tiny_gpt(depth_mup=True)
        assert all(not torch.equal(p, q) for p, q in zip(a.parameters(), start.parameters()))


def test_hyperp_depth_rule():
    model = tiny_gpt(n_layer=4, depth_mup=True)
    assert infer_depth(hidden(model)) == 4
    opt = optimizers.build_optimizer(model, "hyperp", lr=0.04, base_depth=1)
    g = next(g for g in opt.param_groups if g["use_muon"])
    assert g["lr_depth_factor"] == pytest.approx(math.sqrt(1 / 4))
    with pytest.raises(ValueError, match="depth"):
        HyperSphere([{"params": [torch.nn.Parameter(torch.randn(4, 4))], "use_muon": True}],
                    base_depth=2)


def test_muonpp_update_has_mup_spectral_scale():
    model = tiny_gpt()
    opt = optimizers.build_optimizer(model, "muonpp", lr=0.01, momentum=0.0, spectral_target=None)
    before = {n: p.detach().clone() for n, p in hidden(model).items()}
    train(model, opt, 1)
    for n, p in hidden(model).items():
        d = (before[n] - p.detach()).reshape(p.shape[0], -1)  # wd is 0.0 here
        s = torch.linalg.matrix_norm(d, 2).item() / (0.01 * spectral_scale(p.shape))
        assert 0.68 * 0.98 <= s <= 1.21, (n, s)


def test_muonpp_keeps_spectral_ratio_in_band_where_muon_drifts():
    ratios = {}
    for name in ("muonpp", "muon"):
        model = tiny_gpt()
        r0 = hidden_spectral_ratios(model)
        opt = optimizers.build_optimizer(model, name, lr=0.2, weight_decay=0.0,
                                         **({"spectral_target": 1.0} if name == "muonpp" else {}))
        train(model, opt, 25)
        ratios[name] = hidden_spectral_ratios(model)
    for n, r in ratios["muonpp"].items():
        assert r <= max(r0[n], 1.21 * 1.0) + 1e-4, (n, r)  # the bound in MuonPlusPlus's docstring
    assert max(ratios["muon"].values()) > 1.5 * 1.21  # plain Muon leaves the band


def test_auon_normalization_is_the_paper_formula():
    torch.manual_seed(0)
    m = torch.randn(40, 12) * 3
    g = m / (m.norm() + 1e-7)
    expected = g / (torch.sqrt(torch.mean(torch.cosh(g) ** 2)) + 1e-8)
    torch.testing.assert_close(auon_normalize(m), expected)
    u = auon_normalize(m)
    assert u.norm() <= 1 and torch.linalg.matrix_norm(u, 2) < 1


@pytest.mark.parametrize("shape", [(4, 3), (40, 12), (128, 128)])
def test_auon_cosh_scaling_is_within_its_bound_of_plain_frobenius_normalization(shape):
    """The docstring's bound: |G_ij| <= 1 and sum G_ij^2 = 1 give
    mean(cosh(G)^2) <= 1 + sinh(1)^2/N, so U differs from M/||M||_F by < 0.7/N, even for a
    matrix with one huge entry (the cosh map's best case)."""
    torch.manual_seed(0)
    n = shape[0] * shape[1]
    one_hot = torch.zeros(shape)
    one_hot[0, 0] = 1.0  # the extreme case: the bound holds with equality
    spiked = torch.randn(shape)
    spiked[0, 0] = 1e3
    for m in (torch.randn(shape), torch.randn(shape) ** 3, spiked, one_hot):
        u = auon_normalize(m)
        assert 0 <= 1 - u.norm().item() < math.sinh(1) ** 2 / (2 * n) + 1e-6
        torch.testing.assert_close(u / u.norm(), m / m.norm())


def test_auon_and_hybrid_steps():
    for cls in (AuON, HybridAuON):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(24, 8))
        opt = cls([{"params": [w], "use_muon": True}], lr=0.1, momentum=0.0)
        w.grad = torch.randn(24, 8)
        before = w.detach().clone()
        opt.step()
        m = w.grad if cls is AuON else orthogonalize(w.grad, 1)
        expected = before - 0.1 * math.sqrt(24 / 8) * auon_normalize(m)
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)


def test_muonpp_rejects_bad_target():
    with pytest.raises(ValueError, match="spectral_target"):
        MuonPlusPlus([torch.nn.Parameter(torch.randn(4, 4))], spectral_target=0)
