"""StabilityMonitor's attention Z on Hugging Face attention: Llama/Mistral/Qwen-style (rotary,
grouped-query, per-head norms, sliding window), GPT-2 and BERT. The reference is the query and
key HF itself hands to its eager attention (rotary and norms applied by HF's code) with HF's
own mask: Z = mean over rows of logsumexp(q k^T * scaling + mask)^2."""
import importlib
import warnings

import pytest
import torch
import transformers

from toolkit.monitors import stability_indicators

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "llama": dict(model_type="llama", num_key_value_heads=2, **SMALL),
    "mistral": dict(model_type="mistral", num_key_value_heads=1, sliding_window=4, **SMALL),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2, **SMALL),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=16, **SMALL),  # q/k norms
    "gpt2": dict(model_type="gpt2", vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 scale_attn_by_inverse_layer_idx=True),
    "bert": dict(model_type="bert", **SMALL),
}
AUTO = {"bert": transformers.AutoModelForMaskedLM}


def build(name, attn):
    cfg = dict(CONFIGS[name])
    cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), attn_implementation=attn, **cfg)
    torch.manual_seed(0)
    model = AUTO.get(name, transformers.AutoModelForCausalLM).from_config(cfg).eval()
    with torch.no_grad():  # larger q/k weights: logits far from 0 make Z discriminating
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return model


def batch():
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding: every query row keeps at least one key
    return {"input_ids": ids, "attention_mask": mask}


def reference_z(model, name, monkeypatch) -> list[float]:
    """Z per layer from the (query, key, mask) HF passes to its eager attention function."""
    mod = importlib.import_module(type(model).__module__)
    original, seen = mod.eager_attention_forward, []

    def capture(module, query, key, value, attention_mask, scaling=None, **kw):
        k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        logits = (query @ k.transpose(-1, -2)).float() * scaling
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attention_mask, float("-inf"))
            else:
                logits = logits + attention_mask[..., : k.shape[-2]]
        seen.append(torch.logsumexp(logits, -1).square().mean().item())
        return original(module, query, key, value, attention_mask, scaling=scaling, **kw)

    monkeypatch.setattr(mod, "eager_attention_forward", capture)
    with torch.no_grad():
        model(**batch())
    monkeypatch.undo()
    return seen


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_attention_z_matches_hf_eager_attention(name, monkeypatch):
    eager = build(name, "eager")
    ref = reference_z(eager, name, monkeypatch)
    assert len(ref) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no logits adapter" warning
        got = stability_indicators(eager, batch())
    for i in range(2):
        assert got[f"attn_z/layer{i}"] == pytest.approx(ref[i], rel=1e-4), i
    assert got["attn_z/max"] == pytest.approx(max(ref), rel=1e-4)
    # SDPA attention (HF may pass no mask at all) gives the same numbers
    sdpa = build(name, "sdpa")
    again = stability_indicators(sdpa, batch())
    for i in range(2):
        assert again[f"attn_z/layer{i}"] == pytest.approx(ref[i], rel=1e-4), i


def test_sliding_window_changes_z():
    # the Mistral window (4 keys) is applied: a window as long as the sequence gives another Z
    short = stability_indicators(build("mistral", "sdpa"), batch())
    CONFIGS["mistral"]["sliding_window"] = 64
    try:
        long = stability_indicators(build("mistral", "sdpa"), batch())
    finally:
        CONFIGS["mistral"]["sliding_window"] = 4
    assert abs(short["attn_z/layer0"] - long["attn_z/layer0"]) > 1e-3 * long["attn_z/layer0"]
