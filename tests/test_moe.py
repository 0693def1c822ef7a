"""MoEMLP against independent computations: a naive per-token loop, the Switch formula, the
SqrtGate's RMS law; the GPT/CLI wiring, monitors, resume and bad settings."""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_resume import assert_bitwise, straight_and_resumed
from toolkit import LanguageModel, TextDataModule
from toolkit.cli import RECIPES, main
from toolkit.models import GPT, GPTConfig, MoEConfig, MoEMLP
from toolkit.monitors import SpectralMonitor
from toolkit.monitors.stability import stability_indicators


def layer(E=6, k=2, gate="sqrt", shared=False, bias=False, d=12, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = MoEMLP(d, MoEConfig(E, k, shared_expert=shared, gate=gate), 4 * d, bias=bias).to(dtype)
    with torch.no_grad():  # weights large enough that routing and every expert matter
        for p in m.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return m


@torch.no_grad()
def naive(m: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: logits, the k largest by a Python sort, softmax over them, experts."""
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        z = [float(v) for v in m.router.weight @ t]
        top = sorted(range(len(z)), key=lambda e: -z[e])[:m.top_k]
        ez = [math.exp(z[e] - max(z)) for e in top]
        y = torch.zeros_like(t)
        for e, w in zip(top, (v / sum(ez) for v in ez)):
            h = m.w_in[e] @ t + (m.b_in[e] if m.b_in is not None else 0)
            ye = m.w_out[e] @ F.gelu(h) + (m.b_out[e] if m.b_out is not None else 0)
            y = y + (math.sqrt(w) if m.sqrt_gate else w) * ye
        if m.shared is not None:
            s = m.shared(t)
            y = math.sqrt(0.5) * y + math.sqrt(0.5) * s if m.sqrt_gate else y + s
        out.append(y)
    return torch.stack(out).reshape(x.shape)


@pytest.mark.parametrize("gate", ["sqrt", "plain"])
@pytest.mark.parametrize("shared,bias", [(False, False), (True, False), (True, True)])
def test_moe_equals_a_naive_per_token_loop(gate, shared, bias):
    m = layer(gate=gate, shared=shared, bias=bias)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(m(x), naive(m, x), atol=1e-10, rtol=1e-10)
    assert len(set(m.load.tolist())) > 1 and (m.load > 0).sum() > 2  # routing really varied


def test_aux_loss_is_the_switch_formula_and_trains_the_router():
    m = layer(E=5, k=2)
    x = torch.randn(40, 12, dtype=torch.float64)
    m(x)
    z = x @ m.router.weight.T
    counts = torch.zeros(5, dtype=torch.float64)
    for row in z:
        for e in sorted(range(5), key=lambda e: -float(row[e]))[:2]:
            counts[e] += 1
    f, P = counts / counts.sum(), torch.softmax(z, -1).mean(0)
    assert torch.equal(m.load, counts.long())
    assert m.aux_loss.item() == pytest.approx(5 * float((f * P).sum()), rel=1e-12)
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    # a uniform router (P_e = 1/E) gives 1 whatever the counts: Switch's normalization
    m2 = layer(E=4, k=1)
    with torch.no_grad():
        m2.router.weight.zero_()
    m2(torch.randn(8, 12, dtype=torch.float64))
    assert m2.aux_loss.item() == pytest.approx(1.0)


def _rms(m, x):
    return m(x).square().mean().sqrt().item()


def test_sqrt_gate_keeps_the_rms_where_the_plain_gate_drops():
    """Fine-grained experts (ArchScale: E = 4k, hidden = dense/k) on the muP sphere, a router
    whose gates are far from uniform. Uncorrelated experts of equal output RMS s predict
    E|y|^2 = s^2 sum_k g_k^2: s^2 for the sqrt gate, s^2 * mean(sum_k w_k^2) for the plain one."""
    d, x = 64, torch.randn(4096, 64)
    sqrt, plain, predicted = [], [], []
    for E in (4, 8, 16):
        ms = {}
        for gate in ("sqrt", "plain"):
            torch.manual_seed(E)
            m = MoEMLP(d, MoEConfig(E, E // 4, gate=gate), 4 * d)
            with torch.no_grad():
                for w in (m.w_in, m.w_out):  # ||W_e||_F = sqrt(fan_out), HyperP radius_scale 1
                    w.mul_(math.sqrt(w.shape[1]) / w.norm(dim=(1, 2), keepdim=True))
                m.router.weight.normal_(0, 2 / math.sqrt(d))
            ms[gate] = m
        sqrt.append(_rms(ms["sqrt"], x))
        plain.append(_rms(ms["plain"], x))
        _, _, g = ms["plain"].route(x)  # the router alone: gates w, no expert involved
        predicted.append(sqrt[-1] * g.square().sum(-1).mean().sqrt().item())
    assert max(sqrt) / min(sqrt) < 1.05
    assert sqrt[0] == plain[0]  # k = 1: both gates are 1
    for p, want in zip(plain, predicted):
        assert p == pytest.approx(want, rel=0.05)
    assert plain[2] < 0.75 * sqrt[2]


def test_gpt_config_validation_names_the_fix():
    with pytest.raises(ValueError, match="unknown keys.*n_expert"):
        GPTConfig(moe={"n_expert": 4})
    with pytest.raises(ValueError, match="top_k"):
        GPTConfig(moe={"n_experts": 2, "top_k": 3})
    with pytest.raises(ValueError, match="gate"):
        GPTConfig(moe={"n_experts": 4, "gate": "softmax"})
    with pytest.raises(ValueError, match="expert_hidden"):
        GPTConfig(n_embd=32, n_head=2, moe={"n_experts": 6, "top_k": 3})
    with pytest.raises(ValueError, match="aux_loss_weight"):
        LanguageModel(vocab_size=65, moe={"n_experts": 4, "aux_loss_weight": -1})
    assert GPTConfig().moe is None  # dense stays the default


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, moe={"n_experts": 4}))


def test_stability_monitor_reports_the_moe_layers():
    model, x = _gpt(), torch.randint(0, 65, (2, 16))
    got = stability_indicators(model, x)
    inputs = {}
    hooks = [b.ln_2.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, o))
             for i, b in enumerate(model.blocks)]
    model(x)
    for h in hooks:
        h.remove()
    for i, block in enumerate(model.blocks):
        h = inputs[i].reshape(-1, 16)
        z = h @ block.mlp.router.weight.T
        counts = torch.bincount(z.topk(2, -1).indices.reshape(-1), minlength=4)
        y = naive(block.mlp, h)
        assert got[f"mlp_rms/layer{i}"] == pytest.approx(y.square().mean().sqrt().item(), rel=1e-5)
        assert got[f"router_z/layer{i}"] == pytest.approx(
            torch.logsumexp(z, -1).square().mean().item(), rel=1e-5)
        assert got[f"expert_load/layer{i}"] == pytest.approx(4 * counts.max().item() / counts.sum().item())
    assert {"router_z/max", "expert_load/mean"} <= set(got)


def test_spectral_monitor_measures_each_expert():
    model = _gpt()
    got = SpectralMonitor(iters=300).measure(model)
    for name in ("w_in", "w_out"):
        W = getattr(model.blocks[0].mlp, name).detach()
        exact = torch.linalg.matrix_norm(W, ord=2)  # one SVD per expert
        ref = exact.max().item() / math.sqrt(W.shape[1] / W.shape[2])
        assert got[f"W/blocks.0.mlp.{name}"] == pytest.approx(ref, rel=1e-3)


def test_moe_recipe_trains_via_the_cli_and_logs_the_aux_loss(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(RECIPES / "hyperp_moe_lm.yaml"), "--trainer.max_steps", "4",
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "4",
          "--data.batch_size", "4", "--trainer.log_every_n_steps", "1"])
    run = tmp_path / "runs" / "hyperp_moe_lm" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["moe"]["n_experts"] == 8
    assert ckpt["state_dict"]["model.blocks.0.mlp.w_in"].shape[0] == 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = EventAccumulator(str(run)).Reload()
    aux = [e.value for e in ev.Scalars("train/aux_loss")]
    assert aux and all(1.0 <= a / 2 < 8 for a in aux)  # 2 layers, each in [1, E)


def test_moe_lm_resumes_bitwise(tmp_path):
    make_model = lambda: LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2,
                                       n_embd=16, optimizer="hyperp", warmup_steps=2,
                                       moe={"n_experts": 4, "shared_expert": True,
                                            "expert_hidden": 8})
    make_data = lambda: TextDataModule(block_size=16, batch_size=8)
    assert_bitwise(*straight_and_resumed(make_model, make_data, tmp_path, total=6, stop_at=3))


def test_dpsgd_refuses_moe_at_fit_start_and_names_the_fix(monkeypatch, tmp_path):
    from regularizers.dp.errors import PrivacyError
    from regularizers.dp.validate import check_model
    check_model(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16)))  # dense: accepted
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PrivacyError, match=r"blocks\.0\.mlp: MoEMLP.*model\.moe: null"):
        main(["fit", "--config", str(RECIPES / "dp_lm.yaml"), "--model.n_embd", "16",
              "--model.moe", "{n_experts: 4, aux_loss_weight: 0.0}", "--data.batch_size", "16",
              "--trainer.max_steps", "2", "--trainer.logger", "false"])
