"""Polar Express (Amsel, Persson, Musco & Gower 2025, arXiv 2505.16932) as a Newton-Schulz
coefficient table: the published table, an independent float64 transcription, the spectrum
against the quintic, and config-time errors."""
import pytest
import torch

import optimizers
from optimizers import Muon
from optimizers.newton_schulz import (POLAR_EXPRESS, POLAR_EXPRESS_SAFETY, coefficient_schedule,
                                      orthogonalize, orthogonalize_many)
from scripts.papers.muon_family.ns_spectrum import deviation, spectrum_inputs

# Published 5-iteration table ("num_iters=5, safety_factor=2e-2, cushion=2"), copied from
# karpathy/nanochat nanochat/optim.py ``polar_express_coeffs`` (same numbers in
# KellerJordan/modded-nanogpt train_gpt.py); the normalization divides by 1.02 * ||X||_F
# (modded-nanogpt: ``X / (X.norm() * (1 + 2e-2) + eps)``).
PUBLISHED = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
PUBLISHED_SAFETY = 1 + 2e-2


def test_table_is_the_published_one():
    assert [tuple(t) for t in POLAR_EXPRESS] == PUBLISHED
    assert POLAR_EXPRESS_SAFETY == PUBLISHED_SAFETY
    assert coefficient_schedule("polar_express", 7) == PUBLISHED + [PUBLISHED[-1]] * 2
    assert coefficient_schedule("quintic", 2) == [(3.4445, -4.7750, 2.0315)] * 2


def _pe_fp64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Algorithm 1 of the paper, written out in float64 with the published table."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() * PUBLISHED_SAFETY + 1e-7)
    for i in range(steps):
        a, b, c = PUBLISHED[min(i, 4)]
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_fp32_iteration_matches_a_float64_transcription(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = orthogonalize(g, 5, dtype=torch.float32, coefficients="polar_express").double()
    torch.testing.assert_close(ours, _pe_fp64(g), rtol=0, atol=1e-4)
    bf16 = orthogonalize(g, 5, coefficients="polar_express", matmul="fp32").double()
    torch.testing.assert_close(bf16, _pe_fp64(g), rtol=0, atol=0.05)
    # a batch of same-shape matrices gives the single-matrix results bitwise
    many = orthogonalize_many([g, 2 * g], 5, coefficients="polar_express", matmul="fp32")
    assert torch.equal(many[0], orthogonalize(g, coefficients="polar_express", matmul="fp32"))


@pytest.mark.parametrize("precision", ["bf16", "bf16-fp32gemm", "fp32"])
def test_polar_express_is_no_worse_than_the_quintic(precision):
    """GPT-2-small shapes scaled down 4x (scripts/papers/muon_family/ns_spectrum.py runs the full ones)."""
    for shape in [(192, 192), (192, 768), (768, 192)]:
        for kind, x in spectrum_inputs(shape).items():
            pe_worst, pe_median = deviation(x, "polar_express", precision)
            q_worst, q_median = deviation(x, "quintic", precision)
            assert pe_worst <= q_worst, (shape, kind, pe_worst, q_worst)
            assert pe_median <= q_median, (shape, kind, pe_median, q_median)
            if kind == "decaying":  # condition 1/min(shape): inside the fitted interval
                assert pe_worst < 0.2 and q_worst > 0.3


def test_unknown_table_fails_at_config_time_naming_the_choices():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="polar_express"):
        Muon([w], ns_coefficients="cubic")
    with pytest.raises(ValueError, match="quintic"):
        optimizers.build_optimizer(torch.nn.Linear(4, 4), "normuon", ns_coefficients="pe")
    with pytest.raises(ValueError, match="ns_coefficients"):
        orthogonalize(torch.randn(4, 4), coefficients="Polar Express")
    with pytest.raises(ValueError, match="does not use 'ns_coefficients'"):
        optimizers.build_optimizer(torch.nn.Linear(4, 4), "auon", ns_coefficients="quintic")


@pytest.mark.parametrize("name", ["muon", "hyperp", "muonpp", "hybrid_auon", "normuon"])
def test_every_newton_schulz_optimizer_takes_the_table(name):
    """One step with polar_express differs from the quintic's by the orthogonalization alone:
    Muon's step is exactly -lr * ratio * PE(momentum)."""
    torch.manual_seed(0)
    w0, g = torch.randn(16, 24), torch.randn(16, 24)
    out = {}
    for table in ("quintic", "polar_express"):
        w = torch.nn.Parameter(w0.clone())
        opt = optimizers.build_optimizer([{"params": [w], "use_muon": True}], name, lr=0.1,
                                         ns_coefficients=table, ns_matmul="fp32")
        w.grad = g.clone()
        opt.step()
        out[table] = w.detach().clone()
    assert (out["quintic"] - out["polar_express"]).abs().max() > 1e-3
    if name == "muon":  # nesterov: lerp(g, m, 0.95) with m = 0.05 g
        u = torch.lerp(g, 0.05 * g, 0.95)
        d = orthogonalize(u, coefficients="polar_express", matmul="fp32").float()
        torch.testing.assert_close(out["polar_express"], w0 - 0.1 * d, rtol=0, atol=1e-6)
