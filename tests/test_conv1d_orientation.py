"""HF ``Conv1D`` (weight stored (in, out)) is the Linear it is, for every matrix optimizer and the
spectral monitor: steps and measurements equal those of the same layer written as nn.Linear."""
import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import optimizers
from optimizers import Muon, param_groups
from optimizers.muonpp import hidden_spectral_ratios
from optimizers.orientation import fans, group_flags, transposed_names
from toolkit.monitors import SpectralMonitor

# The registry's matrix optimizers: every builder whose class is Muon or derives from it.
MATRIX = sorted(n for n, b in optimizers.OPTIMIZERS.items()
                if isinstance(getattr(b, "optimizer_class", None), type)
                and issubclass(b.optimizer_class, Muon))
# fp32 Newton-Schulz: the two layouts then agree to fp32 rounding. HyperP on the muP sphere
# (radius sqrt(fan_out)); with the initial-norm radius its relative step has no orientation.
KWARGS = {"hyperp": {"radius_scale": 1.0}}


class Net(nn.Module):
    """16 -> 48 -> 12 -> head 5; ``conv`` picks HF Conv1D or nn.Linear for the hidden layers."""

    def __init__(self, conv: bool):
        super().__init__()
        layer = (lambda i, o: Conv1D(o, i)) if conv else (lambda i, o: nn.Linear(i, o))
        self.up, self.down, self.head = layer(16, 48), layer(48, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.down(torch.tanh(self.up(x)))))


def twins():
    torch.manual_seed(0)
    conv, lin = Net(conv=True), Net(conv=False)
    with torch.no_grad():
        for name in ("up", "down"):
            getattr(lin, name).weight.copy_(getattr(conv, name).weight.T)
            getattr(lin, name).bias.copy_(torch.randn(getattr(conv, name).bias.shape))
            getattr(conv, name).bias.copy_(getattr(lin, name).bias)
        lin.head.load_state_dict(conv.head.state_dict())
    return conv, lin


def train(model, opt, steps=3):
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def max_gap(conv, lin) -> float:
    return max((getattr(conv, n).weight.T - getattr(lin, n).weight).abs().max().item()
               for n in ("up", "down"))


def test_registry_has_the_matrix_optimizers():
    assert {"muon", "hyperp", "muonpp", "auon", "hybrid_auon"} <= set(MATRIX)


def test_factory_flags_conv1d_weights_only():
    conv, lin = twins()
    assert transposed_names(conv) == {"up.weight", "down.weight"}
    assert transposed_names(lin) == set()
    for g in param_groups(conv):
        assert g["transposed"] == [n in ("up.weight", "down.weight") for n in g["param_names"]]


@pytest.mark.parametrize("name", MATRIX)
def test_conv1d_step_equals_linear_step(name):
    kw = dict(lr=0.05, weight_decay=0.1, ns_dtype="float32", **KWARGS.get(name, {}))
    kw = {k: v for k, v in kw.items() if k not in optimizers.OPTIMIZERS[name].refused}  # AuON: no NS
    conv, lin = twins()
    train(conv, optimizers.build_optimizer(conv, name, **kw))
    train(lin, optimizers.build_optimizer(lin, name, **kw))
    assert max_gap(conv, lin) < 1e-5
    torch.testing.assert_close(conv.head.weight, lin.head.weight, atol=1e-5, rtol=1e-5)
    # The same step with the flags dropped (Conv1D read as (out, in)) is measurably different,
    # so the agreement above comes from the orientation, not from an insensitive test.
    blind, _ = twins()
    groups = [{**g, "transposed": [False] * len(g["params"])} for g in param_groups(blind, 0.1)]
    train(blind, optimizers.build_optimizer(groups, name, **kw))
    assert max_gap(blind, lin) > 1e-3


@pytest.mark.parametrize("name", MATRIX)
def test_orientation_survives_a_checkpoint(name):
    conv, _ = twins()
    opt = optimizers.build_optimizer(conv, name, lr=0.05, **KWARGS.get(name, {}))
    train(conv, opt, steps=1)
    state = opt.state_dict()
    again = optimizers.build_optimizer(conv, name, lr=0.05, **KWARGS.get(name, {}))
    again.load_state_dict(state)
    assert again.fans(conv.up.weight) == (48, 16) and again.fans(conv.down.weight) == (12, 48)
    assert [g["transposed"] for g in again.param_groups] == [g["transposed"] for g in opt.param_groups]


def test_spectral_measurements_see_the_linear_map():
    conv, lin = twins()
    # Power iteration from different random starts (the vectors live in different spaces):
    # enough iterations that both land on ||W||_2; the layouts' scales differ by 3x here.
    a, b = SpectralMonitor(iters=500).measure(conv), SpectralMonitor(iters=500).measure(lin)
    assert set(a) == set(b) == {"W/up.weight", "W/down.weight", "W/mean", "W/max"}
    for name, (fan_out, fan_in) in {"up": (48, 16), "down": (12, 48)}.items():
        exact = torch.linalg.matrix_norm(getattr(lin, name).weight, 2).item()
        ref = exact / math.sqrt(fan_out / fan_in)  # independent: SVD and the Linear's shape
        assert a[f"W/{name}.weight"] == pytest.approx(ref, rel=1e-3)
        assert b[f"W/{name}.weight"] == pytest.approx(ref, rel=1e-3)
    hc, hl = hidden_spectral_ratios(conv), hidden_spectral_ratios(lin)
    assert hc == pytest.approx(hl, rel=1e-5)


def test_bad_orientation_input_names_the_fix():
    assert fans((48, 16)) == (48, 16) and fans((16, 48), transposed=True) == (48, 16)
    assert fans((8, 3, 3, 3)) == (8, 27)
    with pytest.raises(ValueError, match="only 2-D"):
        fans((8, 3, 3, 3), transposed=True)
    with pytest.raises(ValueError, match="no fan_out"):
        fans((5,))
    w = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="one flag per parameter"):
        group_flags({"params": [w], "transposed": [True, False]})
    with pytest.raises(ValueError, match="flagged transposed"):
        Muon([{"params": [nn.Parameter(torch.zeros(2, 3, 4))], "use_muon": True,
               "transposed": [True]}])
