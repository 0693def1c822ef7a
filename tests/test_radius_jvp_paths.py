"""The two JVPs behind rho_a (``method="forward_ad"``: dual tensors in place of the
parameters; ``method="func"``: torch.func.jvp over functional_call) against each other and
against central finite differences of plain forwards, on an MLP, a CNN with BatchNorm left in
train mode, a small GPT, GroupNorm CNNs (2-D, and 1-D without affine: the lean linear / conv / group-norm
rules of jvp_rules.py), a model with a tied weight, and one with a submodule registered twice (which only
the forward_ad path handles); and the clear errors for forwards forward-mode AD cannot go through."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from regularizers import RadiusControl, directional_logits, softmax_radius
from toolkit.models import GPT, MLP, GPTConfig, SmallCNN


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class _Tied(nn.Module):
    """Embedding and output head share one matrix; ``shared``: one block applied twice under
    two names."""

    def __init__(self, shared: bool, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.again = self.block if shared else nn.Identity()
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.again(self.block(self.emb(ids))))


def _fd_logits(model, x, point, u, train: bool, eps=1e-6):
    """(f(point + eps u) - f(point - eps u)) / 2 eps by plain forwards, in train or eval mode,
    on a copy (a train-mode forward moves BatchNorm's running statistics)."""
    outs = []
    for sign in (1, -1):
        m = copy.deepcopy(model).train(train)
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(point[n] + sign * eps * u[n])
            outs.append(m(x))
    return (outs[0] - outs[1]) / (2 * eps)


def _case(name):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(12, (16, 16), 5), torch.randn(9, 12, generator=gen)
    if name in ("cnn-batchnorm", "cnn-groupnorm"):
        return (SmallCNN(1, 4, 4, name.removeprefix("cnn-").removesuffix("norm"), groups=2, image_size=8, hidden=8),
                torch.randn(6, 1, 8, 8, generator=gen))
    if name == "conv1d-groupnorm-noaffine":
        return (nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.GroupNorm(2, 4, affine=False),
                              nn.Tanh(), nn.Flatten(), nn.Linear(28, 5)),
                torch.randn(5, 3, 7, generator=gen))
    if name == "gpt":  # embeddings, LayerNorm, causal attention (math kernel)
        return (GPT(GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16)),
                torch.randint(0, 13, (3, 8), generator=gen))
    return _Tied(shared=name == "shared-module"), torch.randint(0, 11, (4, 5), generator=gen)


@pytest.mark.parametrize("name", ["mlp", "cnn-batchnorm", "cnn-groupnorm",
                                  "conv1d-groupnorm-noaffine", "gpt", "tied", "shared-module"])
@pytest.mark.parametrize("eval_mode", [True, False])
def test_forward_ad_equals_torch_func_and_finite_differences(name, eval_mode):
    model, x = _case(name)
    model.train()
    if name == "cnn-batchnorm":  # running statistics away from their (0, 1) start
        with torch.no_grad():
            for _ in range(3):
                model(x + 1.0)
    gen = torch.Generator().manual_seed(1)
    point = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen)
             for n, p in model.named_parameters()}  # a point other than the module's weights
    u = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    z_ad, a_ad = directional_logits(model, x, u, point, eval_mode, method="forward_ad")
    fd = _fd_logits(model, x, point, u, train=not eval_mode)
    torch.testing.assert_close(a_ad, fd, rtol=1e-6, atol=1e-7)
    if name == "cnn-batchnorm" and not eval_mode:  # torch.func: no in-place running stats
        with pytest.raises(RuntimeError, match="in-place operation"):
            directional_logits(model, x, u, point, eval_mode, method="func")
    elif name != "shared-module":  # functional_call would leave wrappers in the twice-registered block
        z_fn, a_fn = directional_logits(model, x, u, point, eval_mode, method="func")
        torch.testing.assert_close(a_ad, a_fn, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(z_ad, z_fn, rtol=1e-10, atol=1e-12)
    assert a_ad.abs().max() > 1e-3  # a real derivative, not two zeros agreeing

    # the module is left as it was: its own Parameters, values, buffers and mode flags
    for n, p in model.named_parameters():
        assert isinstance(p, nn.Parameter) and torch.equal(p, weights[n])
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(m.training for m in model.modules())
    if name == "tied":
        assert model.head.weight is model.emb.weight
        rad = [softmax_radius(model, x, u, point, eval_mode, method=m) for m in ("forward_ad", "func")]
        assert rad[0].rho == pytest.approx(rad[1].rho, rel=1e-10) and math.isfinite(rad[0].rho)
        spread = float((fd.amax(-1) - fd.amin(-1)).max()) / math.sqrt(sum(
            float(v.pow(2).sum()) for v in u.values()))
        assert rad[0].rho == pytest.approx(math.pi / spread, rel=1e-6)


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.tanh()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("not used")


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return _NoJvp.apply(self.lin(x))


class _ReadsData(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return x @ self.lin.weight.data.T + self.lin.bias.data


@pytest.mark.parametrize("method, says", [("forward_ad", "not forward-mode differentiable.*jvp"),
                                          ("func", "setup_context")])  # torch.func's own words
def test_forwards_without_forward_mode_derivatives_raise_a_clear_error(method, says):
    model = _Custom()
    weight = model.lin.weight
    delta = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=says):
        softmax_radius(model, torch.randn(2, 3), delta, method=method)
    assert model.lin.weight is weight  # the parameters are put back after the failure
    with pytest.raises(RuntimeError, match="no directional derivative.*module attributes"):
        softmax_radius(_ReadsData(), torch.randn(2, 3), delta, method="forward_ad")


def test_bad_method_and_shapes_name_the_problem():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="method='jax'"):
        directional_logits(model, torch.randn(2, 3), {"weight": torch.zeros(2, 3)}, method="jax")
    with pytest.raises(ValueError, match="method"):
        RadiusControl(method="jax")
    with pytest.raises(ValueError, match=r"shapes differ.*\('weight', \(3, 2\), \(2, 3\)\)"):
        directional_logits(model, torch.randn(2, 3), {"weight": torch.zeros(3, 2)})
