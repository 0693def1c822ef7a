"""Cautious weight decay (arXiv 2510.12402): decay only where the update and the weight share a
sign, checked against a hand computation of one step for several registry optimizers."""
import math

import pytest
import torch

import optimizers
from optimizers.newton_schulz import orthogonalize

LR, WD = 0.1, 0.5


def _setup():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)


def _one_step(name, cautious, **kw):
    w0, grad = _setup()
    w = torch.nn.Parameter(w0.clone())
    groups = [{"params": [w], "use_muon": True}] if name in ("muon", "muonpp") else [w]
    opt = optimizers.build_optimizer(groups, name, lr=LR, weight_decay=WD, cautious_wd=cautious,
                                     **kw)
    w.grad = grad.clone()
    opt.step()
    return w0, grad, w.detach()


def _hand_update(name, w0, g):
    """The step without decay, ``u`` in ``w1 = w0 - LR * u``, by hand (first step)."""
    if name in ("adamw", "adam"):  # m_hat = g, v_hat = g^2
        return g / (g.abs() + 1e-8)
    if name == "sgd":  # the momentum buffer starts as the gradient
        return g
    # Muon (nesterov, momentum 0.95): lerp(g, 0.05 g, 0.95) = 0.0975 g, orthogonalized in fp32
    d = orthogonalize(0.0975 * g, dtype=torch.float32)
    if name == "muon":
        return d * math.sqrt(max(1.0, 6 / 8))
    return d * math.sqrt(6 / 8)  # muonpp: the muP scale sqrt(fan_out / fan_in)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "muon", "muonpp"])
def test_one_step_matches_the_hand_computation(name):
    kw = {"ns_dtype": "float32"} if name.startswith("muon") else {}
    if name == "muonpp":
        kw["spectral_target"] = None  # keep WD (Muon++ otherwise sets 1 / target)
    w0, g, w1 = _one_step(name, True, **kw)
    u = _hand_update(name, w0, g)
    mask = (u * w0 >= 0).to(w0.dtype)
    expected = w0 - LR * u - LR * WD * mask * w0
    torch.testing.assert_close(w1, expected, rtol=0, atol=1e-6)
    assert 0.2 < mask.mean() < 0.8  # both kinds of coordinates are present
    if name in ("adam", "sgd"):  # their plain weight_decay is an L2 term in the gradient
        return
    # plain decoupled decay: the same step, decaying every coordinate
    _, _, plain = _one_step(name, False, **kw)
    torch.testing.assert_close(plain, w0 - LR * u - LR * WD * w0, rtol=0, atol=1e-6)
    spared = mask == 0
    assert (plain[spared] - w1[spared]).abs().min() > 1e-4


def test_off_is_bitwise_the_torch_step_and_bad_values_fail():
    w0, g = _setup()
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = optimizers.build_optimizer([a], "adamw", lr=LR, weight_decay=WD)
    ref = torch.optim.AdamW([b], lr=LR, weight_decay=WD)
    for _ in range(3):
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a, b) and isinstance(ours, torch.optim.AdamW)
    with pytest.raises(ValueError, match="cautious_wd must be true or false"):
        optimizers.build_optimizer(torch.nn.Linear(4, 4), "muon", cautious_wd="yes")
    with pytest.raises(ValueError, match="no option"):
        optimizers.build_optimizer([torch.zeros(2, 3, requires_grad=True)], "rco",
                                   cautious_wd=True)


def test_every_model_optimizer_accepts_the_option():
    for name in optimizers.model_optimizers():
        assert optimizers.optimizer_defaults(name)["cautious_wd"] is False, name


@pytest.mark.parametrize("name,base", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW),
                                       ("adam", torch.optim.Adam)])
def test_step_hooks_run_once_per_step_even_after_torchs_own_class_was_built(name, base):
    """torch wraps the step of each optimizer class it instantiates; the registry's subclass
    must not run the hooks twice once a plain torch optimizer exists (Langevin noise, step
    controls and their counters hang on these hooks)."""
    base([torch.zeros(2, requires_grad=True)], lr=0.1)  # wraps base.step
    w = torch.nn.Parameter(torch.ones(3))
    opt = optimizers.OPTIMIZERS[name].optimizer_class([w], lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))
    opt.register_step_pre_hook(lambda *a: calls.append(0))
    w.grad = torch.ones(3)
    opt.step()
    assert calls == [0, 1]
