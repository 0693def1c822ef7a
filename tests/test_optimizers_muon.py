"""Muon against its references: muon-optimizer's SingleDeviceMuonWithAuxAdam and torch.optim.Muon."""
import copy

import muon
import pytest
import torch

import optimizers
from optimizers import Muon, param_groups
from optimizers.newton_schulz import _owners, orthogonalize, orthogonalize_many
from toolkit.models.gpt import GPT, GPTConfig


# Every registry name built on optimizers.Muon (the matrix optimizers of this issue).
MATRIX_OPTIMIZERS = ("muon", "hyperp", "muonpp", "auon", "hybrid_auon", "normuon")


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 16, **kw}))


def lm_loss(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 65, (4, 17), generator=g)
    return torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def train(model, opt, steps, start=0):
    for s in range(start, start + steps):
        opt.zero_grad()
        lm_loss(model, s).backward()
        opt.step()


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (128, 48), (48, 128)])
def test_newton_schulz_singular_values_in_band(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    s = torch.linalg.svdvals(orthogonalize(g).float())
    # The quintic's exact-arithmetic band is [0.682, 1.14] here (fp64 below); five bf16
    # iterations move singular values by up to ~2%, which the lower edge allows for.
    assert s.min() >= 0.68 * 0.98 and s.max() <= 1.21, (s.min(), s.max())
    exact = torch.linalg.svdvals(_ns_fp64(g))
    assert exact.min() >= 0.68 and exact.max() <= 1.21
    torch.testing.assert_close(s.double(), exact, rtol=0, atol=0.05)


def _ns_fp64(g, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double().T if g.shape[0] > g.shape[1] else g.double()
    x = x / x.norm()
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def test_newton_schulz_transpose_equivariant():
    torch.manual_seed(1)
    g = torch.randn(80, 24)
    torch.testing.assert_close(orthogonalize(g.T).float(), orthogonalize(g).T.float(),
                               rtol=0, atol=0)


def test_batched_newton_schulz_equals_loop_and_reference():
    torch.manual_seed(2)
    mats = [torch.randn(48, 16) for _ in range(3)] + [torch.randn(16, 48), torch.randn(8, 2, 3, 3)]
    mats = [m.reshape(m.shape[0], -1) for m in mats]
    got = orthogonalize_many(mats, 5, matmul="bf16")
    for m, o in zip(mats, got):
        assert torch.equal(o, muon.zeropower_via_newtonschulz5(m, 5))
    # the fp32-GEMM form batched (tall and wide together) equals itself one matrix at a time
    got = orthogonalize_many(mats, 5, matmul="fp32")
    for m, o in zip(mats, got):
        assert torch.equal(o, orthogonalize(m, matmul="fp32"))


def test_fp32_gemm_form_is_the_reference_up_to_accumulation_order():
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns
    torch.manual_seed(3)
    g = torch.randn(6, 96, 256)
    ref = muon.zeropower_via_newtonschulz5(g, 5).double()
    ours = orthogonalize_many(list(g), 5, matmul="fp32")
    theirs = [torch_ns(m, (3.4445, -4.7750, 2.0315), 5, 1e-7) for m in g]
    for r, o, t in zip(ref, ours, theirs):
        assert o.dtype == torch.bfloat16
        ours_err = ((o.double() - r).norm() / r.norm()).item()
        torch_err = ((t.double() - r).norm() / r.norm()).item()
        # closer to the reference than torch.optim.Muon's own (addmm) form of it
        assert ours_err < 0.015 and ours_err < 0.7 * torch_err, (ours_err, torch_err)
    # a single product is a bf16 GEMM: fp32 accumulation, one bf16 rounding of the output
    x = g[0].bfloat16()
    exact = x.double() @ x.double().T
    got = orthogonalize.__globals__["_bf16_via_fp32"](x, x.T).double()
    assert ((got - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()


def test_auto_matmul_follows_the_hardware(monkeypatch):
    from optimizers import newton_schulz
    monkeypatch.setattr(newton_schulz, "native_bf16_gemm", lambda device: False)
    assert newton_schulz._resolve("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(newton_schulz, "native_bf16_gemm", lambda device: True)
    assert newton_schulz._resolve("auto", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="not one of"):
        Muon([torch.nn.Parameter(torch.ones(2, 2))], ns_matmul="fast")


def test_fp32_newton_schulz_matches_reference_and_is_closer_to_exact():
    torch.manual_seed(4)
    for shape in [(96, 32), (32, 96)]:
        g = torch.randn(shape)
        exact, ref = _ns_fp64(g), muon.zeropower_via_newtonschulz5(g, 5).double()
        fp32 = orthogonalize(g, dtype=torch.float32).double()
        assert ((fp32 - ref).norm() / ref.norm()) < 0.06  # bf16 tolerance
        assert (fp32 - exact).norm() < 0.1 * (ref - exact).norm()


def test_owner_split_balances_flops():
    shapes = [torch.Size((96, 32))] * 4 + [torch.Size((32, 32))] * 4
    own = _owners(shapes, 2)
    assert sorted(own[:4]) == [0, 0, 1, 1] and sorted(own[4:]) == [0, 0, 1, 1]


def _groups(model, muon_lr=0.02, adam_lr=3e-3, wd=0.1):
    return [{"params": g["params"], "use_muon": g["use_muon"], "weight_decay": g["weight_decay"],
             "lr": muon_lr if g["use_muon"] else adam_lr} for g in param_groups(model, wd)]


def test_matches_single_device_muon_with_aux_adam():
    ours, ref = tiny_gpt(), tiny_gpt()
    opt = Muon(_groups(ours), ns_matmul="bf16")
    ref_opt = muon.SingleDeviceMuonWithAuxAdam(_groups(ref))
    train(ours, opt, 5)
    train(ref, ref_opt, 5)
    start = tiny_gpt()
    for (n, a), b, s in zip(ours.named_parameters(), ref.parameters(), start.parameters()):
        assert not torch.equal(a, s), f"{n} did not move"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_default_trains_like_reference():
    ours, ref, start = tiny_gpt(), tiny_gpt(), tiny_gpt()
    train(ours, Muon(_groups(ours)), 5)
    train(ref, muon.SingleDeviceMuonWithAuxAdam(_groups(ref)), 5)
    for a, b, s in zip(ours.parameters(), ref.parameters(), start.parameters()):
        assert ((a - b).norm() / (b - s).norm()) < 0.03


def test_fp32_newton_schulz_option_trains_like_reference():
    ours, ref, start = tiny_gpt(), tiny_gpt(), tiny_gpt()
    train(ours, Muon(_groups(ours), ns_dtype="float32"), 3)
    train(ref, muon.SingleDeviceMuonWithAuxAdam(_groups(ref)), 3)
    for a, b, s in zip(ours.parameters(), ref.parameters(), start.parameters()):
        # the bf16 reference's own rounding is ~3-5% of the distance moved
        assert ((a - b).norm() / (b - s).norm()) < 0.07


def test_extra_group_keys_and_factory():
    model = tiny_gpt()
    opt = optimizers.build_optimizer(model, "muon", lr=0.02, weight_decay=0.1, adam_lr=1e-3,
                                     betas=[0.9, 0.99], nesterov=False, ns_steps=3)
    kinds = {g["kind"]: g for g in opt.param_groups}
    assert kinds["hidden"]["use_muon"] and kinds["hidden"]["lr"] == 0.02
    assert kinds["embedding"]["lr"] == 1e-3 and kinds["embedding"]["betas"] == (0.9, 0.99)
    assert "param_names" in kinds["hidden"]
    train(model, opt, 2)


def _muon_pair(adjust):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(a, b) * 0.05) for a, b in [(96, 32), (32, 96), (48, 48)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = Muon([{"params": ps, "use_muon": True}], lr=0.01, weight_decay=0.1, adjust_lr=adjust)
    ref = torch.optim.Muon(qs, lr=0.01, weight_decay=0.1, adjust_lr_fn=adjust)
    start = [p.detach().clone() for p in ps]
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    return [(p.detach() - s, q.detach() - s) for p, q, s in zip(ps, qs, start)]


# "original" scales the bf16 update before the add, as muon-optimizer does (torch folds the
# scale into the step size): one bf16 rounding of a ~0.02-sized step apart.
@pytest.mark.parametrize("adjust,atol", [("match_rms_adamw", 2e-6), ("original", 5e-5)])
def test_adjust_lr_matches_torch_muon_with_same_newton_schulz(adjust, atol, monkeypatch):
    # Same NS arithmetic in both: everything else (momentum, decay, lr scale) must agree.
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz",
                        lambda g, coef, steps, eps: muon.zeropower_via_newtonschulz5(g, steps))
    for ours, ref in _muon_pair(adjust):
        torch.testing.assert_close(ours, ref, rtol=0, atol=atol)


def test_match_rms_adamw_matches_torch_muon_within_bf16():
    # torch's NS rounds differently in bf16 (~2-4% of the update); a wrong scale is >= 10%.
    for ours, ref in _muon_pair("match_rms_adamw"):
        assert ((ours - ref).norm() / ref.norm()) < 0.06


@pytest.mark.parametrize("name", MATRIX_OPTIMIZERS)
def test_state_dict_round_trip_resumes_bitwise(name):
    a = tiny_gpt()
    opt = optimizers.build_optimizer(a, name, lr=0.02, weight_decay=0.1, adam_lr=1e-2)
    train(a, opt, 3)
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt.state_dict())
    train(a, opt, 3, start=3)
    b = tiny_gpt(seed=5)
    b.load_state_dict(saved_model)
    opt_b = optimizers.build_optimizer(b, name, lr=0.02, weight_decay=0.1, adam_lr=1e-2)
    opt_b.load_state_dict(saved_opt)
    train(b, opt_b, 3, start=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_closure_called_exactly_once():
    model = tiny_gpt()
    opt = optimizers.build_optimizer(model, "muon", lr=0.02)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = lm_loss(model, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.isfinite(loss)


def test_grad_left_untouched():
    model = tiny_gpt()
    opt = optimizers.build_optimizer(model, "muon", lr=0.02)
    lm_loss(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_conv_filters_are_orthogonalized_as_matrices():
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = Muon([{"params": [conv.weight], "use_muon": True}], lr=0.1, momentum=0.0)
    conv.weight.grad = torch.randn_like(conv.weight)
    before = conv.weight.detach().clone()
    opt.step()
    s = torch.linalg.svdvals(((before - conv.weight.detach()) / 0.1).reshape(8, -1))
    assert s.min() >= 0.68 and s.max() <= 1.21


def test_fsdp_sharded_params_raise_clear_error():
    p = torch.nn.Parameter(torch.randn(64))
    p._fsdp_flattened = True  # what FSDP sets on flat-parameter shards
    with pytest.raises(RuntimeError, match="strategy='ddp'"):
        Muon([{"params": [p], "use_muon": False}])


def test_bad_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="use_muon"):
        Muon([{"params": [torch.nn.Parameter(torch.randn(4, 4))]}])
    with pytest.raises(ValueError, match="use_muon=False"):
        Muon([{"params": [torch.nn.Parameter(torch.randn(4))], "use_muon": True}])
    with pytest.raises(ValueError, match="adjust_lr"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], adjust_lr="moonlight")


@pytest.mark.parametrize("name", ["muon", "hyperp"])
def test_lightning_checkpoint_resume_is_bitwise(tmp_path, name):
    """Automatic optimization (step(closure)) and a Lightning checkpoint resume exactly."""
    from tests.test_resume import assert_bitwise, straight_and_resumed
    from toolkit import LanguageModel, TextDataModule
    make_model = lambda: LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2,
                                       n_embd=32, optimizer=name, lr=0.02, warmup_steps=2,
                                       optimizer_kwargs={"adam_lr": 3e-3})
    make_data = lambda: TextDataModule(block_size=16, batch_size=8)
    assert_bitwise(*straight_and_resumed(make_model, make_data, tmp_path, total=8, stop_at=4))
