"""NorMuon (arXiv 2510.05491) against an independent float64 transcription of the reference
(microsoft/dion dion/normuon.py: Muon's update, then ``_normuon_normalization_core``)."""
import copy
import math

import pytest
import torch

import optimizers
from optimizers import NorMuon

QUINTIC = (3.4445, -4.7750, 2.0315)


def _ns64(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    x = m.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    a, b, c = QUINTIC
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def reference(w0, grads, lr=0.05, wd=0.1, momentum=0.95, beta2=0.95, eps=1e-8):
    """The NorMuon step on a (fan_out, fan_in) matrix, float64, written out from the paper/dion."""
    w = w0.double().clone()
    buf = torch.zeros_like(w)
    v = torch.zeros(w.shape[0], 1, dtype=torch.float64)
    for g in grads:
        g = g.double()
        buf = momentum * buf + (1 - momentum) * g
        u = (1 - momentum) * g + momentum * buf  # Nesterov: lerp(g, buf, momentum)
        o = _ns64(u)
        v = beta2 * v + (1 - beta2) * (o * o).mean(dim=1, keepdim=True)
        n = o / (v.sqrt() + eps)
        upd = n * (o.norm() / n.norm().clamp_min(1e-8))
        w = w * (1 - lr * wd) - lr * math.sqrt(max(1.0, w.shape[0] / w.shape[1])) * upd
    return w, v


def _grads(shape, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of very different scales: the per-neuron normalization has something to do
    scale = torch.logspace(-1, 1, shape[0]).unsqueeze(1)
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]


@pytest.mark.parametrize("shape", [(16, 24), (24, 16)])
def test_steps_match_a_float64_transcription(shape):
    torch.manual_seed(0)
    w0, grads = torch.randn(shape), _grads(shape)
    w = torch.nn.Parameter(w0.clone())
    opt = optimizers.build_optimizer([{"params": [w], "use_muon": True}], "normuon", lr=0.05,
                                     weight_decay=0.1, ns_dtype="float32")
    for g in grads:
        w.grad = g.clone()
        opt.step()
    ref_w, ref_v = reference(w0, grads)
    torch.testing.assert_close(w.detach().double(), ref_w, rtol=0, atol=2e-5)
    torch.testing.assert_close(opt.state[w]["neuron_second_moment"].double(), ref_v,
                               rtol=1e-4, atol=1e-9)
    # and it is not Muon: the normalization changed the weights
    m = torch.nn.Parameter(w0.clone())
    muon = optimizers.build_optimizer([{"params": [m], "use_muon": True}], "muon", lr=0.05,
                                      weight_decay=0.1, ns_dtype="float32")
    for g in grads:
        m.grad = g.clone()
        muon.step()
    assert (m - w).abs().max() > 1e-3


def test_conv1d_storage_normalizes_output_neurons():
    """A (fan_in, fan_out) weight flagged transposed steps as the transpose of a Linear one."""
    torch.manual_seed(1)
    w0, grads = torch.randn(16, 24), _grads((16, 24))
    lin = torch.nn.Parameter(w0.clone())
    conv = torch.nn.Parameter(w0.T.clone())
    o1 = NorMuon([{"params": [lin], "use_muon": True}], lr=0.05, ns_dtype="float32")
    o2 = NorMuon([{"params": [conv], "use_muon": True, "transposed": [True]}], lr=0.05,
                 ns_dtype="float32")
    for g in grads:
        lin.grad, conv.grad = g.clone(), g.T.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(conv.detach().T, lin.detach(), rtol=0, atol=1e-6)
    assert o2.state[conv]["neuron_second_moment"].shape == (1, 16)


def test_state_dict_resume_is_bitwise():
    torch.manual_seed(2)
    w0, grads = torch.randn(16, 24), _grads((16, 24), n=6)
    w = torch.nn.Parameter(w0.clone())
    opt = NorMuon([{"params": [w], "use_muon": True}], lr=0.05, weight_decay=0.1)
    for g in grads[:3]:
        w.grad = g.clone()
        opt.step()
    saved_w, saved = w.detach().clone(), copy.deepcopy(opt.state_dict())
    assert "neuron_second_moment" in saved["state"][0]
    for g in grads[3:]:
        w.grad = g.clone()
        opt.step()
    w2 = torch.nn.Parameter(saved_w)
    opt2 = NorMuon([{"params": [w2], "use_muon": True}], lr=0.05, weight_decay=0.1)
    opt2.load_state_dict(saved)
    for g in grads[3:]:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w2, w)


@pytest.mark.parametrize("beta2", [1.0, -0.1, 1.5])
def test_beta2_outside_the_unit_interval_fails_at_config_time(beta2):
    with pytest.raises(ValueError, match=r"beta2 must be in \[0, 1\)"):
        optimizers.build_optimizer(torch.nn.Linear(4, 4), "normuon", beta2=beta2)
