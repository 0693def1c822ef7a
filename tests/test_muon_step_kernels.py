"""The fast forms of Muon's step against the references they must equal bit for bit: the chunked
AdamW against ``muon.adam_update``, the in-place Newton-Schulz against the muon package's
iteration, and ``ns_matmul="addmm"`` against ``torch.optim.Muon``."""
import muon
import pytest
import torch
from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns

from optimizers import Muon, aux_adam
from optimizers.newton_schulz import _in_place, _quintic, orthogonalize, orthogonalize_many

ABC = (3.4445, -4.7750, 2.0315)


def _adam_inputs(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-2 for s in shapes]
    return ps, grads, [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_chunked_adamw_is_the_reference_update_bitwise(monkeypatch, wd):
    monkeypatch.setattr(aux_adam, "CHUNK", 100)  # several chunks and a ragged last one
    shapes = [(37, 11), (250,), (3, 4, 5)]
    ps, grads, m, v = _adam_inputs(shapes)
    rp, rg, rm, rv = _adam_inputs(shapes)
    for t in (1, 2, 3):
        aux_adam.adam_step(ps, grads, m, v, [t] * 3, lr=1e-2, betas=(0.9, 0.95), eps=1e-10,
                           weight_decay=wd)
        for p, g, a, b in zip(rp, rg, rm, rv):  # SingleDeviceMuonWithAuxAdam's loop body
            u = muon.adam_update(g.clone(), a, b, t, (0.9, 0.95), 1e-10)
            p.mul_(1 - 1e-2 * wd)
            p.add_(u, alpha=-1e-2)
    for a, b in zip(ps + m + v, rp + rm + rv):
        assert torch.equal(a, b)


def test_chunked_cautious_decay_equals_the_foreach_form(monkeypatch):
    monkeypatch.setattr(aux_adam, "CHUNK", 64)
    shapes = [(33, 7), (100,)]
    a, b = _adam_inputs(shapes), _adam_inputs(shapes)
    kw = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.5, cautious_wd=True)
    for t in (1, 2):
        aux_adam.adam_step(*a, [t, t], **kw)
        aux_adam._foreach(*b, [1 - 0.9 ** t] * 2, [1 - 0.95 ** t] * 2, kw["lr"], 0.9, 0.95,
                          kw["eps"], kw["weight_decay"], True)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape", [(48, 160), (64, 64), (160, 48)])
def test_in_place_iteration_is_the_allocating_one_bitwise(shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    wide = x.mT.contiguous() if shape[0] > shape[1] else x
    assert torch.equal(_in_place(wide.bfloat16(), 5), muon.zeropower_via_newtonschulz5(wide, 5))
    assert torch.equal(_in_place(wide.bfloat16(), 5, "polar_express"),
                       _quintic(wide.bfloat16(), 5, torch.matmul, "polar_express"))
    assert torch.equal(_in_place(wide.clone(), 5), _quintic(wide.clone(), 5, torch.matmul))
    # the optimizer's path (one CPU matrix at a time, tall ones laid out wide) runs it
    (got,) = orthogonalize_many([x], 5, matmul="bf16")
    ref = muon.zeropower_via_newtonschulz5(wide, 5)
    assert torch.equal(got, ref.mT if wide is not x else ref)


def test_in_place_iteration_leaves_its_input_alone():
    u = torch.randn(32, 64)
    before = u.clone()
    orthogonalize_many([u], 5, dtype=torch.float32)
    orthogonalize(u)
    assert torch.equal(u, before)


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64)])
def test_addmm_form_is_torch_optim_muons_iteration_bitwise(shape):
    torch.manual_seed(1)
    g = torch.randn(shape)
    ref = torch_ns(g, ABC, 5, 1e-7)
    assert torch.equal(orthogonalize(g, matmul="addmm"), ref)
    assert torch.equal(orthogonalize_many([g], 5, matmul="addmm")[0], ref)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_addmm_form_steps_like_torch_optim_muon_bitwise(adjust):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(a, b) * 0.05) for a, b in [(96, 32), (32, 96), (48, 48)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = Muon([{"params": ps, "use_muon": True}], lr=0.01, weight_decay=0.1, adjust_lr=adjust,
                ns_matmul="addmm")
    ref = torch.optim.Muon(qs, lr=0.01, weight_decay=0.1, adjust_lr_fn=adjust)
    for s in range(3):
        gen = torch.Generator().manual_seed(s)
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
