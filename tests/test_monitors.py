"""Monitors: massive activations + emergence law, HyperP indicators, spectral condition."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn

from toolkit.models import GPT, GPTConfig
from toolkit.monitors import (MassiveActivationMonitor, SpectralMonitor, StabilityMonitor,
                              activation_stats, attention_logits, emergence_law, find_blocks,
                              fit_emergence, massive_activations, outlier_share, power_iteration,
                              read_history, resolve_layers, softmax_z, stability_indicators)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- massive activations

def planted(seed=0):
    h = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(seed))
    h[0, 0, 7] = 2500.0
    return h


def test_planted_value_is_found_exactly_and_flagged():
    s = activation_stats(planted())
    assert (s.batch, s.token, s.dim) == (0, 0, 7)
    assert s.top1 == 2500.0 and s.massive
    assert s.median == pytest.approx(planted().abs().median().item())
    assert s.ratio == pytest.approx(2500.0 / s.median)
    assert s.top_positions[0] == (0, 7) and s.top_values[0] == 2500.0
    assert s.top_values[1] == pytest.approx(planted().abs().flatten().sort().values[-2].item())


def test_gaussian_hidden_states_are_not_flagged():
    s = activation_stats(torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(1)))
    assert not s.massive and s.ratio < 20
    # Large but not ~1000x the median (Sun et al. need both): not flagged either.
    assert not activation_stats(500 * torch.randn(2, 8, 16)).massive


class Plant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        if self.value:
            x = x.clone()
            x[:, 0, 7] = self.value
        return x


class PlantedNet(nn.Module):
    """Residual stream of Gaussian noise; block 1 writes 2500 at token 0, dim 7."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Plant(v) for v in (0.0, 2500.0, 0.0))
        self.heads = nn.ModuleList([nn.Linear(32, 32)])  # a smaller list auto must ignore

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_massive_activations_on_blocks_auto_and_explicit():
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    out = massive_activations(PlantedNet(), x)
    assert list(out) == ["blocks.0", "blocks.1", "blocks.2"]
    assert [s.massive for s in out.values()] == [False, True, True]
    assert (out["blocks.1"].token, out["blocks.1"].dim) == (0, 7)
    only = massive_activations(PlantedNet(), x, layers=["blocks.2"])
    assert list(only) == ["blocks.2"] and only["blocks.2"].massive
    with pytest.raises(ValueError, match="not modules"):
        massive_activations(PlantedNet(), x, layers=["blocks.9"])
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_auto_layers_on_gpt_and_torch_encoder():
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=3, n_head=2, n_embd=16))
    assert [l.name for l in find_blocks(gpt)] == ["blocks.0", "blocks.1", "blocks.2"]
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 2,
                                enable_nested_tensor=False)
    layers = resolve_layers(enc)
    assert [l.name for l in layers] == ["layers.0", "layers.1"] and layers[0].seq_first
    x = torch.randn(8, 3, 16)  # (T, B, C): the planted token must come back as token 5
    x[5, 1, 3] = 1e4
    enc.layers[0].linear2.weight.data.zero_()
    enc.layers[0].self_attn.out_proj.weight.data.zero_()
    enc.layers[0].norm1 = enc.layers[0].norm2 = nn.Identity()
    s = massive_activations(enc, x)["layers.0"]
    assert (s.batch, s.token, s.dim) == (1, 5, 3)


# ---------------------------------------------------------------- emergence law

def test_fit_recovers_parameters_of_synthetic_law():
    true = (50.0, 0.05, 0.01, 1.0, 2.0)
    t = np.arange(0, 10001, 100)
    y = emergence_law(t, *true)
    y = y + np.random.default_rng(0).normal(0, 0.002 * np.ptp(y), y.shape)
    fit = fit_emergence(t, y)
    assert fit.r2 > 0.99
    np.testing.assert_allclose(fit.params, true, rtol=0.05)


def test_lambda_zero_is_pure_log_growth():
    t = np.linspace(0, 5000, 60)
    np.testing.assert_allclose(emergence_law(t, 3.0, 0.0, 0.02, 1.5, 7.0),
                               3.0 * np.log(0.02 * t + 1.5) + 7.0, rtol=1e-12)
    y = 3.0 * np.log(0.02 * t + 1.5) + 7.0
    fit = fit_emergence(t, y)
    assert fit.r2 > 0.99 and fit.lam < 1e-3
    np.testing.assert_allclose(fit(t), y, rtol=1e-3)
    with pytest.raises(ValueError, match="at least 6"):
        fit_emergence(t[:4], y[:4])


def test_fit_massive_script_on_saved_history(tmp_path):
    t = np.arange(0, 3001, 50)
    rows = []
    for layer, p in enumerate([(40.0, 0.2, 0.004, 1.0, 3.0), (8.0, 0.0, 0.01, 1.0, 5.0)]):
        for s, r in zip(t, emergence_law(t, *p)):
            rows.append(dict(step=int(s), layer=layer, name=f"blocks.{layer}", top1=r, median=1.0,
                             ratio=r, batch=0, token=0, dim=7, massive=0))
    from toolkit.monitors import write_history
    path = write_history(rows, tmp_path / "massive_activations.csv")
    from scripts.papers.massive_activations import fit as mod
    result = mod.main([str(path)])
    assert set(result) == {"0", "1"} and all(f["r2"] > 0.99 for f in result.values())
    assert (tmp_path / "massive_ratio.png").stat().st_size > 0
    assert (tmp_path / "massive_heatmap.png").stat().st_size > 0
    assert read_history(path)[3]["step"] == 150


# ---------------------------------------------------------------- HyperP indicators

@pytest.mark.parametrize("n", [1, 7, 64])
def test_z_of_uniform_logits_is_log_n_squared(n):
    assert softmax_z(torch.zeros(2, 3, 5, n)).item() == pytest.approx(math.log(n) ** 2, rel=1e-6, abs=1e-6)
    # A shift c of every logit moves log Z by c.
    assert softmax_z(torch.full((2, n), 0.7)).item() == pytest.approx((0.7 + math.log(n)) ** 2)


def test_z_with_causal_mask_matches_row_loop():
    logits = torch.randn(2, 3, 6, 6)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    ref = np.mean([math.log(sum(math.exp(logits[b, h, i, j]) for j in range(i + 1))) ** 2
                   for b in range(2) for h in range(3) for i in range(6)])
    assert softmax_z(logits, keep).item() == pytest.approx(ref, rel=1e-5)


def test_outlier_share():
    assert outlier_share(torch.full((3, 4, 50), 0.1)).item() == 0.0
    assert outlier_share(torch.zeros(2, 8)).item() == 0.0
    h = torch.zeros(1, 2, 100)
    h[0, 0, 3] = 1.0
    assert outlier_share(h).item() == pytest.approx(1 / 200)
    x = torch.distributions.StudentT(2.0).sample((5, 7, 64))
    naive = sum(abs(v - row.mean()) > 5 * row.std(unbiased=False)
                for row in x.reshape(-1, 64) for v in row) / x.numel()
    assert outlier_share(x).item() == pytest.approx(float(naive))


def test_attention_logits_reproduce_the_modules_attention():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    attn, x = gpt.blocks[0].attn, torch.randn(3, 8, 16)
    logits, keep = attention_logits(attn, (x,), {})
    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
    _, _, v = attn.qkv(x)
    y = attn.c_proj((probs @ v).transpose(1, 2).reshape(3, 8, 16))
    torch.testing.assert_close(y, attn(x), atol=1e-5, rtol=1e-5)

    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    mask = nn.Transformer.generate_square_subsequent_mask(8)
    _, w = mha(x, x, x, attn_mask=mask, need_weights=True)
    logits, keep = attention_logits(mha, (x, x, x), {"attn_mask": mask})
    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1).mean(1)
    torch.testing.assert_close(probs, w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- spectral condition

@pytest.mark.parametrize("shape", [(64, 48), (24, 8, 3, 3)])
def test_power_iteration_matches_matrix_norm(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.matrix_norm(W.reshape(shape[0], -1), 2).item()
    sigma, v = power_iteration(W, iters=500)
    assert sigma == pytest.approx(ref, rel=1e-3)
    # Warm start: after a small change a few iterations from the old vector suffice.
    W2 = W + 0.01 * torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ref2 = torch.linalg.matrix_norm(W2.reshape(shape[0], -1), 2).item()
    assert power_iteration(W2, v, iters=3)[0] == pytest.approx(ref2, rel=1e-3)


# ---------------------------------------------------------------- in training

class Collect(Logger):
    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict] = {}

    name, version, experiment = "collect", 0, None

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


class Naive(L.LightningModule):
    """A plain LightningModule that knows nothing of monitors; it counts the hooks present
    on its modules at every training step."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = GPT(GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16))
        self.hook_counts: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules())
        self.hook_counts.append((self.global_step, n))
        x, y = batch
        return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loader(n_batches=5):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 13, (n_batches * 4, 17), generator=g)
    return torch.utils.data.DataLoader(list(zip(data[:, :-1], data[:, 1:])), batch_size=4)


def monitors(every=5, out=None):
    return [MassiveActivationMonitor(every_n_steps=every, out_dir=out, plots=False),
            StabilityMonitor(every_n_steps=every), SpectralMonitor(every_n_steps=every, iters=30)]


def trainer(steps, callbacks, logger, **kw):
    return L.Trainer(max_steps=steps, callbacks=callbacks, logger=logger, accelerator="cpu",
                     enable_progress_bar=False, enable_model_summary=False, **kw)


def test_monitors_on_a_plain_lightning_module(tmp_path):
    model, log = Naive(), Collect()
    cbs = monitors(out=str(tmp_path))
    trainer(12, cbs, log, enable_checkpointing=False).fit(model, token_loader())
    # Hooks exist during logging steps 0, 5, 10 and at no other step.
    assert [s for s, n in model.hook_counts if n] == [0, 5, 10]
    assert all(n == 0 for s, n in model.hook_counts if s % 5)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert sorted(log.rows) == [0, 5, 10]
    row = log.rows[10]
    for key in ("massive/ratio/layer0", "massive/top1/layer1", "stability/attn_z/layer1",
                "stability/attn_rms/max", "stability/mlp_rms/layer0", "stability/outlier_pct/mean",
                "stability/logit_z", "spectral/W/net.blocks.0.attn.c_attn.weight",
                "spectral/dW/net.blocks.1.mlp.c_proj.weight"):
        assert key in row and math.isfinite(row[key]), key
    assert not any(k.startswith("spectral/dW") for k in log.rows[0])
    # Spectral values against an exact SVD of the final logged weights.
    W = model.net.blocks[1].mlp.c_fc.weight.detach()
    spec = cbs[2]
    exact = torch.linalg.matrix_norm(spec.previous["net.blocks.1.mlp.c_fc.weight"], 2).item()
    assert row["spectral/W/net.blocks.1.mlp.c_fc.weight"] == pytest.approx(
        exact / math.sqrt(W.shape[0] / W.shape[1]), rel=1e-3)
    # History: every layer at every logging step, in state and in the CSV.
    hist = cbs[0].history
    assert [(r["step"], r["layer"]) for r in hist] == [(s, l) for s in (0, 5, 10) for l in (0, 1)]
    with open(tmp_path / "massive_activations.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert hist[-1]["ratio"] == pytest.approx(row["massive/ratio/layer1"])


def tiny_lm():
    from toolkit import LanguageModel, TextDataModule
    torch.manual_seed(0)
    return (LanguageModel(block_size=16, n_layer=2, n_head=2, n_embd=16, lr=1e-2,
                          lr_decay="constant"),
            TextDataModule(block_size=16, batch_size=4, val_blocks=4))


def test_monitor_state_resumes_exactly(tmp_path):
    # The toolkit's LanguageModel + TextDataModule resume exactly (data = f(step)), so a
    # resumed run's monitors must log what an uninterrupted run logs.
    full = monitors(out=str(tmp_path / "full"))
    trainer(20, full, Collect(), enable_checkpointing=False, limit_val_batches=0).fit(*tiny_lm())
    first = monitors(out=str(tmp_path / "first"))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(10, first + [ckpt], Collect(), limit_val_batches=0).fit(*tiny_lm())
    second = monitors(out=str(tmp_path / "second"))
    trainer(20, second, Collect(), enable_checkpointing=False, limit_val_batches=0).fit(
        *tiny_lm(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [r["step"] for r in second[0].history] == [0, 0, 5, 5, 10, 10, 15, 15]
    for a, b in zip(full[0].history, second[0].history):
        assert a["ratio"] == pytest.approx(b["ratio"], rel=1e-5)
    with open(tmp_path / "second" / "massive_activations.csv") as f:  # history carried over
        assert [int(r["step"]) for r in csv.DictReader(f)][::2] == [0, 5, 10, 15]
    assert set(second[2].vectors) == set(full[2].vectors)
    for name, v in full[2].vectors.items():
        torch.testing.assert_close(second[2].vectors[name], v, atol=1e-5, rtol=1e-4)


def test_bad_every_n_steps():
    with pytest.raises(ValueError, match="positive integer"):
        StabilityMonitor(every_n_steps=0)


# ---------------------------------------------------------------- Hugging Face

def bert():
    transformers = pytest.importorskip("transformers")  # in the `test` extra
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg)


def test_functional_monitors_on_hf_bert():
    model = bert()
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    batch = {"input_ids": torch.randint(0, 50, (2, 12)), "attention_mask": mask}
    out = massive_activations(model, batch)
    assert list(out) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    # Hidden states from transformers' own output_hidden_states must match the hooks.
    model.eval()
    hs = model(**batch, output_hidden_states=True).hidden_states
    assert out["bert.encoder.layer.1"].top1 == pytest.approx(hs[2].abs().max().item())
    ind = stability_indicators(model, batch)
    for k in ("attn_z/layer0", "attn_z/layer1", "attn_rms/layer0", "mlp_rms/layer1",
              "outlier_pct/layer0", "logit_z"):
        assert math.isfinite(ind[k]), k
    # attn Z from BERT's own attention probabilities: p_ij = exp(l_ij) / Z_i, so
    # log Z_i = l_ij - log p_ij for any attended j (use j = 0, always attended).
    attn = model.bert.encoder.layer[0].attention.self
    x = hs[0]
    q = attn.query(x).view(2, 12, 4, 8).transpose(1, 2)
    k = attn.key(x).view(2, 12, 4, 8).transpose(1, 2)
    l0 = (q @ k.transpose(-1, -2))[..., 0] / math.sqrt(8)
    probs = model(**batch, output_attentions=True).attentions[0]
    ref = (l0 - probs[..., 0].log()).square().mean().item()
    assert ind["attn_z/layer0"] == pytest.approx(ref, rel=1e-4)


class BertLM(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.bert = bert()

    def training_step(self, batch, batch_idx):
        return self.bert(input_ids=batch[0], labels=batch[1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_monitor_callbacks_train_an_hf_bert(tmp_path):
    log = Collect()
    data = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(list(zip(data, data)), batch_size=4)
    trainer(3, monitors(every=2, out=str(tmp_path)), log, enable_checkpointing=False).fit(BertLM(), loader)
    assert sorted(log.rows) == [0, 2]
    row = log.rows[2]
    assert "massive/ratio/layer1" in row and "stability/attn_z/layer1" in row
    assert "stability/logit_z" in row
    assert "spectral/dW/bert.bert.encoder.layer.0.attention.self.query.weight" in row


def test_functional_monitors_on_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    x = torch.randint(0, 50, (2, 12))
    assert list(massive_activations(model, x)) == ["transformer.h.0", "transformer.h.1"]
    ind = stability_indicators(model, {"input_ids": x})
    out = model(x, output_attentions=True, output_hidden_states=True)
    attn = model.transformer.h[1].attn
    h = model.transformer.h[1].ln_1(out.hidden_states[1])
    q, k, _ = (t.view(2, 12, 4, 8).transpose(1, 2) for t in attn.c_attn(h).split(32, dim=2))
    l0 = (q @ k.transpose(-1, -2))[..., 0] / math.sqrt(8)  # key 0 is seen by every row
    ref = (l0 - out.attentions[1][..., 0].log()).square().mean().item()
    assert ind["attn_z/layer1"] == pytest.approx(ref, rel=1e-4)
    logits = out.logits
    assert ind["logit_z"] == pytest.approx(torch.logsumexp(logits, -1).square().mean().item(),
                                           rel=1e-5)


def test_fixed_probe_measures_the_same_batch_after_each_update(tmp_path):
    from toolkit.monitors import massive_activations
    model, data = tiny_lm()
    mon = MassiveActivationMonitor(every_n_steps=5, out_dir=str(tmp_path), plots=False,
                                   fit=False, probe="fixed")
    trainer(11, [mon], Collect(), enable_checkpointing=False, limit_val_batches=0).fit(model, data)
    assert [r["step"] for r in mon.history][::2] == [0, 5, 10]
    assert isinstance(mon.fixed_batch, (tuple, list)) and mon.fixed_batch[0].shape == (4, 16)
    # step 10 is the last update, so the final weights on the saved batch give its row
    again = massive_activations(model, mon.fixed_batch)
    for row, stats in zip(mon.history[-2:], again.values()):
        assert row["ratio"] == pytest.approx(stats.ratio, rel=1e-6)
        assert (row["token"], row["dim"]) == (stats.token, stats.dim)
    assert all(not m._forward_hooks for m in model.modules())
    assert mon.state_dict()["fixed_batch"] is mon.fixed_batch


def test_fixed_probe_needs_a_forward_and_a_known_mode():
    with pytest.raises(ValueError, match="probe="):
        MassiveActivationMonitor(probe="val")
    mon = MassiveActivationMonitor(every_n_steps=5, plots=False, probe="fixed")
    with pytest.raises(TypeError, match="defines no forward"):
        trainer(2, [mon], Collect(), enable_checkpointing=False).fit(Naive(), token_loader())
