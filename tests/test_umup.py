"""u-muP (Blake et al., ICLR 2025, arXiv 2407.17465) and muP on the toolkit GPT.

Oracles: the reference package ``unit_scaling`` (per-op forward and gradients on identical
weights), the paper's Table 3 Adam-LR row written out here by hand, an independent RMS
measurement at initialization across widths, and logits recorded from the GPT before the
parametrizations existed (sp must be unchanged).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import optimizers
from toolkit import LanguageModel
from toolkit.models import GPT, GPTConfig
from toolkit.models import unit_ops as U

uu = pytest.importorskip("unit_scaling")
import unit_scaling.functional as UF  # noqa: E402
from unit_scaling.core.functional import transformer_residual_scaling_rule  # noqa: E402
from unit_scaling.optim import lr_scale_func_adam  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _pair(*shapes, seed=0):
    """Two identical sets of leaf tensors (ours, the reference's)."""
    g = _gen(seed)
    a = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]
    return a, [t.detach().clone().requires_grad_() for t in a]


def _same(ours, ref, a, b):
    torch.testing.assert_close(ours, ref, **TOL)
    g = torch.randn(ours.shape, generator=_gen(9), dtype=ours.dtype)
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, **TOL)


@pytest.mark.parametrize("readout", [False, True])
def test_linear_matches_reference(readout):
    a, b = _pair((4, 7, 48), (96, 48), (96,))
    ref = (UF.linear_readout if readout else UF.linear)(*b)
    _same(U.linear(*a, readout=readout), ref, a, b)


@pytest.mark.parametrize("mult", [1.0, 0.5, 3.0])
def test_gelu_matches_reference(mult):
    a, b = _pair((4, 9, 32))
    _same(U.gelu(a[0], mult), UF.gelu(b[0], mult=mult), a, b)


@pytest.mark.parametrize("mult", [1.0, 4.0])
def test_attention_matches_reference(mult):
    a, b = _pair((2, 3, 16, 8), (2, 3, 16, 8), (2, 3, 16, 8))
    ref = UF.scaled_dot_product_attention(*b, is_causal=True, mult=mult)
    _same(U.attention(*a, mult=mult), ref, a, b)


def test_embedding_add_norm_residual_loss_match_reference():
    idx = torch.randint(0, 20, (3, 5), generator=_gen(1))
    a, b = _pair((20, 16))
    _same(U.embedding(idx, a[0]), UF.embedding(idx, b[0]), a, b)
    a, b = _pair((3, 5, 16), (3, 5, 16))
    _same(U.add(*a), UF.add(*b), a, b)
    a, b = _pair((3, 5, 16), (16,))
    _same(U.layer_norm(a[0], (16,), a[1], None, 1e-5),
          UF.layer_norm(b[0], (16,), b[1], None, 1e-5), a, b)
    for tau in (0.3, 1.0, 2.0):
        a, b = _pair((3, 5, 16), (16, 16))
        h, skip = U.residual_split(a[0], tau)
        ours = U.residual_add(torch.tanh(h @ a[1]), skip, tau)
        h, skip = UF.residual_split(b[0], tau)
        _same(ours, UF.residual_add(torch.tanh(h @ b[1]), skip, tau), a, b)
    a, b = _pair((3, 5, 11))
    y = torch.randint(0, 11, (15,), generator=_gen(2))
    _same(U.cross_entropy(a[0], y), UF.cross_entropy(b[0].reshape(-1, 11), y), a, b)
    torch.testing.assert_close(U.cross_entropy(a[0], y), F.cross_entropy(a[0].reshape(-1, 11), y))


@pytest.mark.parametrize("mult,ratio", [(1.0, 1.0), (0.5, 2.0)])
def test_residual_rule_matches_reference(mult, ratio):
    ref = transformer_residual_scaling_rule(mult, ratio)
    L = 3
    assert U.residual_taus(L, mult, ratio) == pytest.approx(
        [(ref(2 * i, 2 * L), ref(2 * i + 1, 2 * L)) for i in range(L)], rel=1e-12)


def _umup(width, n_layer=2, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=n_layer, n_head=max(1, width // 32),
                         n_embd=width, parametrization="umup", **kw)).double()


def test_umup_block_matches_reference_composition():
    """A whole u-muP block against the same computation written with the reference's ops."""
    m = _umup(64, residual_mult=0.7, residual_attn_ratio=1.5, attn_softmax_mult=2.0,
              ffn_act_mult=0.8)
    blk, cfg = m.blocks[1], m.cfg
    x = torch.randn(2, 16, 64, generator=_gen(3), dtype=torch.float64)
    taus = transformer_residual_scaling_rule(0.7, 1.5)
    h, skip = UF.residual_split(x, taus(2, 4))
    h = F.layer_norm(h, (64,), blk.ln_1.weight)
    q, k, v = UF.linear(h, blk.attn.c_attn.weight, None).split(64, dim=2)
    q, k, v = (t.view(2, 16, 2, 32).transpose(1, 2) for t in (q, k, v))
    y = UF.scaled_dot_product_attention(q, k, v, is_causal=True, mult=2.0)
    y = UF.linear(y.transpose(1, 2).reshape(2, 16, 64), blk.attn.c_proj.weight, None)
    x1 = UF.residual_add(y, skip, taus(2, 4))
    h, skip = UF.residual_split(x1, taus(3, 4))
    h = UF.gelu(UF.linear(F.layer_norm(h, (64,), blk.ln_2.weight), blk.mlp.c_fc.weight, None),
                mult=0.8)
    ref = UF.residual_add(UF.linear(h, blk.mlp.c_proj.weight, None), skip, taus(3, 4))
    torch.testing.assert_close(blk(x), ref, **TOL)
    assert cfg.residual_mult == 0.7


def _rms(t):
    return t.detach().double().pow(2).mean().sqrt().item()


def _init_scales(width: int) -> dict[str, float]:
    """RMS of every weight, the embedding sum, each block's output, the pre-readout stream and
    the logits times sqrt(width), at initialization, by plain forward hooks."""
    m = _umup(width, n_layer=3).float()
    out = {name: _rms(p) for name, p in m.named_parameters()}
    for i, b in enumerate(m.blocks):
        b.register_forward_hook(lambda mod, a, o, i=i: out.__setitem__(f"block{i}", _rms(o)))
    m.ln_f.register_forward_hook(lambda mod, a, o: out.__setitem__("ln_f", _rms(o)))
    m.blocks[0].register_forward_pre_hook(lambda mod, a: out.__setitem__("embed", _rms(a[0])))
    idx = torch.randint(0, 65, (8, 64), generator=_gen(4))
    out["logits*sqrt(width)"] = _rms(m(idx)) * math.sqrt(width)
    return out


@pytest.mark.parametrize("width", [64, 128, 256, 512])
def test_unit_scale_at_init(width):
    """u-muP at init: weights, the embedding sum and the stream into the readout have RMS 1;
    block outputs stay within a factor 2 of 1 (they drift up with depth: the flat-attention
    scale assumes values independent across positions, which the stream after block 0 is not)
    and, the muP half of the claim, do not move with width; the logits are 1/fan_in-scaled by
    design (muP's readout), so logits * sqrt(width) has RMS 1."""
    got, base = _init_scales(width), _init_scales(64)
    for k, v in got.items():
        if k.startswith("block"):
            assert 0.7 < v < 2.0 and abs(v / base[k] - 1) < 0.15, (k, v, base[k])
        else:
            assert abs(v - 1) < 0.2 if k.startswith("logits") else abs(v - 1) < 0.05, (k, v)
    # sp for contrast: its stream is far from unit scale at the same width
    torch.manual_seed(0)
    sp, seen = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=3, n_head=max(1, width // 32),
                             n_embd=width)), {}
    sp.blocks[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    sp(torch.randint(0, 65, (8, 64), generator=_gen(4)))
    assert _rms(seen["x"]) < 0.1


def _lrs(model, name="adamw", lr=1.0, **kw):
    opt = optimizers.build_optimizer(model, name, lr=lr, weight_decay=0.0, **kw)
    return {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}


# u-muP, Table 3 (Adam LR row): input 1/sqrt(fan_out), hidden 1/sqrt(fan_in), output 1;
# residual-block tensors (hidden, norms) times 1/sqrt(depth) (Sec. 4.4 / depth-muP).
def _paper_table(d, L):
    hidden = {"attn.c_attn": d, "attn.c_proj": d, "mlp.c_fc": d, "mlp.c_proj": 4 * d}
    t = {"model.wte.weight": d ** -0.5, "model.wpe.weight": d ** -0.5,
         "model.lm_head.weight": 1.0, "model.ln_f.weight": 1.0}
    for i in range(L):
        for layer, fan_in in hidden.items():
            t[f"model.blocks.{i}.{layer}.weight"] = fan_in ** -0.5 / math.sqrt(L)
        for ln in ("ln_1", "ln_2"):
            t[f"model.blocks.{i}.{ln}.weight"] = 1 / math.sqrt(L)
    return t


@pytest.mark.parametrize("d,L", [(64, 2), (256, 4)])
def test_factory_lrs_follow_paper_table(d, L):
    m = LanguageModel(vocab_size=65, n_embd=d, n_layer=L, n_head=d // 32, parametrization="umup")
    got = _lrs(m, lr=0.5)
    want = {k: 0.5 * v for k, v in _paper_table(d, L).items()}
    assert got == pytest.approx(want, rel=1e-12)
    # the reference optimizer's rule on the same tensors agrees
    for name, p in m.named_parameters():
        kind = ("output" if "lm_head" in name else "norm" if p.ndim == 1 else "weight")
        fake = SimpleNamespace(mup_type=kind, shape=p.shape,
                               mup_scaling_depth=L if ".blocks." in name else None)
        assert got[name] == pytest.approx(0.5 * lr_scale_func_adam(fake), rel=1e-12), name


def test_factory_lrs_muon_and_mup():
    d, L = 128, 2
    m = LanguageModel(vocab_size=65, n_embd=d, n_layer=L, n_head=4, parametrization="umup")
    got = _lrs(m, "muon", lr=0.02, adam_lr=2.0)
    table = _paper_table(d, L)
    for name, mult in table.items():
        if ".blocks." in name and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            fan_in = 4 * d if "mlp.c_proj" in name else d  # Muon: x sqrt(fan_in) / sqrt(L)
            assert got[name] == pytest.approx(0.02 * math.sqrt(fan_in / L)), name
        else:  # Muon's AdamW groups get the Adam table on adam_lr
            assert got[name] == pytest.approx(2.0 * mult), name
    mup = LanguageModel(vocab_size=65, n_embd=256, n_layer=L, n_head=8, parametrization="mup",
                        mup_base_width=64)
    got = _lrs(mup, lr=0.01)
    for name, lr in got.items():  # muP (TP5 Table 8): hidden lr / width_mult, the rest lr
        hidden = ".blocks." in name and name.endswith(("c_attn.weight", "c_proj.weight",
                                                       "c_fc.weight"))
        assert lr == pytest.approx(0.01 / 4 if hidden else 0.01), name


def test_sp_unchanged():
    """Logits and weights of seed 0 recorded from the GPT before parametrizations existed."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32))
    x = torch.randint(0, 65, (2, 32), generator=_gen(1))
    y = m(x)
    want = torch.tensor([[-0.17338423, -0.06780534, 0.15527274, -0.15386209],
                         [-0.15061300, -0.19111782, 0.34850386, -0.08194747]])
    torch.testing.assert_close(y[0, :2, :4], want, rtol=0, atol=2e-6)
    assert y.double().sum().item() == pytest.approx(43.16086490745329, abs=1e-3)
    assert sum(p.double().sum() for p in m.parameters()).item() == pytest.approx(
        311.4353880567299, abs=1e-6)
    assert all(type(mod) in (torch.nn.Linear, torch.nn.Embedding) for mod in m.modules()
               if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)))
    assert all("lr" not in g for g in optimizers.param_groups(m))


def test_bad_settings_fail_at_config_time():
    with pytest.raises(ValueError, match=r"'sp', 'mup', 'umup'"):
        GPTConfig(parametrization="mu-p")
    with pytest.raises(ValueError, match="parametrization: umup"):
        LanguageModel(vocab_size=65, residual_mult=2.0)
    with pytest.raises(ValueError, match="depth_mup"):
        LanguageModel(vocab_size=65, parametrization="umup", depth_mup=True)
    with pytest.raises(ValueError, match="> 0"):
        GPTConfig(parametrization="umup", output_mult=0.0)


def test_fp8_casts_saturate_and_round():
    x = torch.tensor([1000.0, 0.3, 1e-9, -500.0], requires_grad=True)
    y = U.fp8_forward(x)
    assert y.tolist() == [448.0, 0.3125, 0.0, -448.0]
    z = U.fp8_backward(x)
    z.backward(torch.tensor([1e6, 0.3, 1e-9, 1.0]))
    assert x.grad.tolist() == [57344.0, 0.3125, 0.0, 1.0]


def test_umup_in_fp8_stays_close_to_fp32():
    """One forward/backward in simulated FP8 against fp32 on the same weights: u-muP's loss
    within 1% and its weight gradient within E5M2's rounding (2 mantissa bits, ~10%)."""
    idx = torch.randint(0, 65, (4, 32), generator=_gen(5))
    losses, grads = [], []
    for fp8 in (False, True):
        torch.manual_seed(0)
        lm = LanguageModel(vocab_size=65, n_embd=64, n_layer=2, n_head=2, block_size=32,
                           parametrization="umup", fp8=fp8)
        loss, _ = lm.lm_loss((idx[:, :-1], idx[:, 1:]))
        loss.backward()
        losses.append(loss.item())
        grads.append(lm.model.blocks[0].attn.c_attn.weight.grad)
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 0.15


def test_monitor_reads_umup_attention_logits():
    from toolkit.monitors.stability.attention import attention_logits
    m = _umup(64, attn_softmax_mult=2.0).float()
    attn = m.blocks[0].attn
    x = torch.randn(2, 8, 64, generator=_gen(6))
    logits, _ = attention_logits(attn, (x,), {})
    q, k, _ = attn.qkv(x)
    torch.testing.assert_close(logits, q @ k.transpose(-1, -2) * 2.0 / 32)


@pytest.mark.parametrize("optimizer,opts", [("adamw", {}), ("muon", {"adam_lr": 0.5})])
def test_umup_resume_is_bitwise(tmp_path, optimizer, opts):
    """Stop and resume from last.ckpt == a straight run, with u-muP's split param groups."""
    from tests.test_resume import assert_bitwise, straight_and_resumed
    from toolkit import TextDataModule
    make_model = lambda: LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2,
                                       n_embd=32, parametrization="umup", optimizer=optimizer,
                                       lr=0.5 if optimizer == "adamw" else 0.02,
                                       optimizer_kwargs=opts, warmup_steps=2)
    make_data = lambda: TextDataModule(block_size=16, batch_size=8)
    assert_bitwise(*straight_and_resumed(make_model, make_data, tmp_path, total=8, stop_at=4))


def test_stability_probe_reads_umup_branch_contributions():
    """The stability monitor's attn/mlp RMS is each branch's contribution to the stream: under
    u-muP the branch output times tau / sqrt(1 + tau^2)."""
    from toolkit.monitors.layers import Hooks, resolve_layers
    from toolkit.monitors.stability.core import StabilityProbe
    m = _umup(64).float()
    probe = StabilityProbe(m, resolve_layers(m))
    seen = {}
    m.blocks[1].mlp.register_forward_hook(lambda mod, a, o: seen.__setitem__("mlp", _rms(o)))
    with Hooks() as hooks:
        probe.attach(hooks)
        m(torch.randint(0, 65, (2, 16), generator=_gen(7)))
    tau = m.blocks[1].taus[1]
    assert probe.values["mlp_rms/layer1"].item() == pytest.approx(
        seen["mlp"] * tau / math.sqrt(1 + tau * tau), rel=1e-5)


def test_sweep_summary_counts_grid_steps():
    """scripts.papers.umup: best lr per width, its shift in x2 steps, the default-eta gap."""
    from scripts.papers.umup import summarize
    rows = [("umup", 64, 0.5, 2.0), ("umup", 64, 1.0, 2.02), ("umup", 128, 1.0, 1.9),
            ("umup", 128, 0.5, 1.95), ("sp", 64, 2 ** -7, 2.1), ("sp", 128, 2 ** -9, 2.0),
            ("sp", 128, 2 ** -7, 2.2)]
    res = [{"parametrization": p, "width": w, "lr": lr, "fp8": False, "seed": 0, "val_loss": v}
           for p, w, lr, v in rows]
    res.append({**res[2], "fp8": True, "val_loss": 1.919})
    s = summarize(res, ["sp", "umup"], [64, 128], 128)
    assert s["umup_best_lrs"] == [0.5, 1.0] and s["umup_shift_steps"] == 1
    assert s["sp_shift_steps"] == 2
    assert s["umup_w64_default_gap_pct"] == 1.0 and s["umup_fp8_gap_pct"] == 1.0
