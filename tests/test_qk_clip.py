"""QKClip (Kimi K2's QK-clip, arXiv 2507.20534): after every step the max attention logit,
recomputed here by separate code, is <= tau; the GQA key-head mapping; HF layouts; refusals."""
import importlib
import math
import types

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import regularizers
from regularizers.qk_clip import attention_modules, clip_, clip_forward_, watch_forward
from tests.test_hf_attention_z import batch, build
from toolkit import LanguageModel

TAU = 2.0


def _gpt_max_logit(gpt, x) -> float:
    """Max causal q.k/sqrt(d) over heads and layers, from each block's input and c_attn's weights
    (not the monitor's adapter), eval mode."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in gpt.blocks]
    was = gpt.training
    gpt.eval()
    with torch.no_grad():
        gpt(x)
        gpt.train(was)
        for h in hooks:
            h.remove()
        worst = -math.inf
        for block, h in zip(gpt.blocks, inputs):
            z = block.ln_1(h)
            W, C, H = block.attn.c_attn.weight, z.shape[-1], block.attn.n_head
            q, k = (z @ W[:C].T), (z @ W[C:2 * C].T)
            B, T, _ = z.shape
            q = q.view(B, T, H, C // H).transpose(1, 2)
            k = k.view(B, T, H, C // H).transpose(1, 2)
            s = q @ k.transpose(-1, -2) / math.sqrt(C // H)
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
            worst = max(worst, s.max().item())
    return worst


class _Check(L.Callback):
    def __init__(self):
        self.after = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(_gpt_max_logit(pl_module.model, batch[0]))


def test_post_step_measure_keeps_max_logit_at_tau_after_every_step():
    L.seed_everything(0, verbose=False)
    model = LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32,
                          optimizer="muon", lr=0.1, weight_decay=0.0)
    with torch.no_grad():  # large q/k weights: logits far above tau from the start
        for b in model.model.blocks:
            b.attn.c_attn.weight.mul_(30)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (64, 17), generator=g)
    data = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)
    before = _gpt_max_logit(model.model, x[:8, :-1])
    assert before > 5 * TAU
    qk, check = regularizers.QKClip(tau=TAU, alpha=0.5, measure="post_step"), _Check()
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[qk, check], log_every_n_steps=1)
    trainer.fit(model, data)
    assert len(check.after) == 6
    assert max(check.after) <= TAU * (1 + 1e-5), check.after
    assert max(check.after) > 0.9 * TAU  # clipped to tau, not far below it
    assert qk.clipped_total >= 4 and qk.state_dict()["clipped_total"] == qk.clipped_total
    assert qk.last["qk_clip/max_logit/max"] > TAU


def test_forward_measure_clips_by_the_training_forwards_logits():
    """Kimi K2's order: logits of the step's own forward; with lr 0 (weights unmoved) and one
    layer the post-step max is then exactly tau."""
    L.seed_everything(0, verbose=False)
    model = LanguageModel(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32,
                          optimizer="sgd", lr=0.0, weight_decay=0.0, lr_decay="constant")
    with torch.no_grad():
        model.model.blocks[0].attn.c_attn.weight.mul_(30)
    x = torch.randint(0, 65, (8, 17), generator=torch.Generator().manual_seed(0))
    before = _gpt_max_logit(model.model, x[:, :-1])
    assert before > 5 * TAU
    qk, check = regularizers.QKClip(tau=TAU, measure="forward"), _Check()
    calls = []  # c_attn runs once per training step: the forward watch recomputes no projection
    model.model.blocks[0].attn.c_attn.register_forward_hook(
        lambda m, a, o: calls.append(1) if m.training else None)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[qk, check])
    trainer.fit(model, DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8))
    assert check.after[0] == pytest.approx(TAU, rel=1e-5)
    assert qk.measure == "forward" and len(calls) == 1
    assert not qk._watch  # hooks removed after the batch


def _watched(model, inputs) -> list[torch.Tensor]:
    """Per layer, the (H,) max logit QK-clip's forward watch records in one training forward."""
    mods, store = attention_modules(model), []
    handles = watch_forward(mods, store)
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return store


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_forward_watch_reads_hf_attentions_own_logits(name, monkeypatch):
    """The max the forward watch takes from the projections HF already computed equals the max
    of the q/k HF hands its eager attention in that same forward (rotary, GQA, masks by HF;
    train mode, so dropout upstream changes nothing: both read the same forward)."""
    model = build(name, "eager")
    seen = []
    mod = importlib.import_module(type(model).__module__)
    original = mod.eager_attention_forward

    def capture(module, query, key, value, attention_mask, scaling=None, **kw):
        seen.append(_eager_max(query, key, attention_mask, scaling))
        return original(module, query, key, value, attention_mask, scaling=scaling, **kw)

    monkeypatch.setattr(mod, "eager_attention_forward", capture)
    got = _watched(model, batch())
    assert len(got) == len(seen) == 2
    for g, ref in zip(got, seen):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


def test_forward_watch_on_toolkit_gpt_and_multihead_attention():
    torch.manual_seed(0)
    lm = LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32)
    x = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(0))
    got = _watched(lm.model, x)
    worst = _gpt_max_logit(lm.model, x)  # eval mode; the GPT has no dropout by default
    assert max(float(m.max()) for m in got) == pytest.approx(worst, rel=1e-5)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0,
                                                                       batch_first=True), 1)
    z = torch.randn(2, 5, 16)
    mods, store = attention_modules(enc), []
    handles = watch_forward(mods, store)  # no projection layer to hook: recomputed from inputs
    enc.train()
    enc(z)
    for h in handles:
        h.remove()
    attn = enc.layers[0].self_attn
    W = attn.in_proj_weight.detach()
    q = (z @ W[:16].T + attn.in_proj_bias[:16]).view(2, 5, 4, 4).transpose(1, 2)
    k = (z @ W[16:32].T + attn.in_proj_bias[16:32]).view(2, 5, 4, 4).transpose(1, 2)
    ref = (q @ k.transpose(-1, -2) / 2.0).amax(dim=(0, 2, 3))
    torch.testing.assert_close(store[0], ref.detach(), rtol=1e-5, atol=1e-5)


def _eager_max(query, key, attention_mask, scaling) -> torch.Tensor:
    k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    s = (query @ k.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        keep = attention_mask if attention_mask.dtype == torch.bool else \
            attention_mask > torch.finfo(attention_mask.dtype).min / 2
        s = s.masked_fill(~keep[..., : k.shape[-2]], -math.inf)
    return s.amax(dim=(0, 2, 3)).detach()


def _hf_max_logits(model, monkeypatch) -> list[torch.Tensor]:
    """Per layer, the (H,) max logit from the query/key HF hands its eager attention."""
    mod = importlib.import_module(type(model).__module__)
    original, seen = mod.eager_attention_forward, []

    def capture(module, query, key, value, attention_mask, scaling=None, **kw):
        seen.append(_eager_max(query, key, attention_mask, scaling))
        return original(module, query, key, value, attention_mask, scaling=scaling, **kw)

    monkeypatch.setattr(mod, "eager_attention_forward", capture)
    with torch.no_grad():
        model(**batch())
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_hf_layouts_end_at_tau(name, monkeypatch):
    model = build(name, "eager")
    before = torch.stack(_hf_max_logits(model, monkeypatch))
    tau = float(before.max()) / 3  # several heads above, some possibly below
    mods = attention_modules(model)
    stats = clip_forward_(model, batch(), mods, tau, 0.5)
    torch.testing.assert_close(stats[0][0], before[0], rtol=1e-4, atol=1e-4)  # the same logit
    after = torch.stack(_hf_max_logits(model, monkeypatch))
    assert after.max() <= tau * (1 + 1e-5), after
    assert sum(int(c) for _, c in stats) >= 2


def test_gqa_key_head_takes_the_largest_of_its_query_heads():
    model = build("llama", "eager")  # 4 query heads, 2 key heads of 8 dims
    attn = model.model.layers[0].self_attn
    (_, _, layout), = [m for m in attention_modules(model) if m[1] is attn]
    q0, k0 = attn.q_proj.weight.clone(), attn.k_proj.weight.clone()
    gamma = clip_(layout, torch.tensor([200.0, 50.0, 300.0, 120.0]), 100.0, 0.25)
    torch.testing.assert_close(gamma, torch.tensor([0.5, 1.0, 1 / 3, 100 / 120]))
    q_expect = torch.tensor([0.5, 1.0, 1 / 3, 100 / 120]) ** 0.25
    k_expect = torch.tensor([0.5, 1 / 3]) ** 0.75  # min over query heads (0, 1) and (2, 3)
    hd = layout.head_dim
    torch.testing.assert_close(attn.q_proj.weight, q0 * q_expect.repeat_interleave(hd)[:, None])
    torch.testing.assert_close(attn.k_proj.weight, k0 * k_expect.repeat_interleave(hd)[:, None])


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="tau"):
        regularizers.QKClip(tau=0.0)
    with pytest.raises(ValueError, match="alpha"):
        regularizers.QKClip(alpha=1.5)
    with pytest.raises(ValueError, match="measure"):
        regularizers.QKClip(measure="before")
    with pytest.raises(ValueError, match="public_inputs needs measure='post_step'"):
        regularizers.QKClip(measure="forward", public_inputs=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="q_norm"):
        attention_modules(build("qwen3", "eager"))
    mlp = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    with pytest.raises(ValueError, match="0.0: no attention|no nn.ModuleList"):
        attention_modules(mlp)
    lm = LanguageModel(vocab_size=65, block_size=8, n_layer=1, n_head=2, n_embd=16)
    dp = regularizers.DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=1.0)
    trainer = types.SimpleNamespace(callbacks=[dp], optimizers=[])
    with pytest.raises(ValueError, match="public_inputs"):
        regularizers.QKClip().on_fit_start(trainer, lm)
    public = regularizers.QKClip(public_inputs=torch.zeros(2, 8, dtype=torch.long))
    assert not public.reads_batch_into_update
    public.on_fit_start(trainer, lm)  # a public batch composes with DP-SGD
    assert len(public._modules) == 1


@pytest.mark.parametrize("block", [1 << 24, 64])  # one/two query blocks; many small blocks
@pytest.mark.parametrize("T,S,causal", [(9, 9, True), (4, 9, True), (9, 9, False)])
def test_max_per_head_equals_the_masked_max_in_float64(block, T, S, causal, monkeypatch):
    """HeadsQK.max_per_head (query blocks, keys after a causal block skipped, 0/-inf bias)
    against the plain masked max of q.k^T * scale in float64; the largest logit of head 0 is
    put on the diagonal, the one a block that skipped one key too many would miss."""
    from toolkit.monitors.stability import attention as A
    monkeypatch.setattr(A, "BLOCK", block)
    g = torch.Generator().manual_seed(T + S)
    q, k = torch.randn(3, 4, T, 8, generator=g), torch.randn(3, 4, S, 8, generator=g)
    q[1, 0, T - 1] = k[1, 0, S - 1] = 3.0
    keep = A._causal(T, S, "cpu") if causal else None
    pad = torch.ones(3, 1, 1, S, dtype=torch.bool)
    pad[2, ..., :2] = False
    for mask in (keep, A._and(keep, pad)):
        got = A.HeadsQK(q, k, 0.3, mask, causal).max_per_head()
        ref = (q.double() @ k.double().transpose(-1, -2)) * 0.3
        if mask is not None:
            ref = ref.masked_fill(~mask, -math.inf)
        torch.testing.assert_close(got.double(), ref.amax(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
