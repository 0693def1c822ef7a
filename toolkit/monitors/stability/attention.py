"""Attention logits of an attention module, for the stability monitor's attention Z (HyperP;
Ren et al., "Rethinking Language Model Scaling under Transferable Hypersphere Optimization":
Z = mean over attention rows of (log sum_j exp l_ij)^2) and QK-clip's per-head max logit
(Kimi K2, arXiv 2507.20534, Sec. 2.1: ``S_max^h = max_ij q_i^h . k_j^h * scale``).

One definition of "the logit" for both: :func:`attention_qk` turns a module's query/key
projections into heads-first ``q``, ``k`` (key heads repeated to the query heads), the logit
``scale`` and a keep-mask (True = attended); :meth:`HeadsQK.logits` and
:meth:`HeadsQK.max_per_head` read that. The projections are either recomputed from the module's
inputs (:func:`attention_logits`, the monitor's pre-hook) or taken from the outputs the module's
own projection layers produced in the forward that already ran (:func:`watch_attention`, no
extra projection). Layouts:

- the toolkit's ``CausalSelfAttention`` (fused ``c_attn``) and ``nn.MultiheadAttention``
  (no projection sub-module: always recomputed);
- Hugging Face Llama/Mistral/Qwen-style attention (``q_proj``/``k_proj``, rotary position
  embeddings passed as ``position_embeddings=(cos, sin)``, grouped-query attention: query
  head h reads key head ``h // (H / H_kv)``, optional per-head ``q_norm``/``k_norm`` as in
  Qwen3, sliding windows as in Mistral);
- Hugging Face GPT-2 (``c_attn`` Conv1D, ``scale_attn_by_inverse_layer_idx`` included);
- Hugging Face BERT-style self-attention (``query``/``key`` Linear, padding mask).

Anything else returns None (the monitor then warns once and skips attention Z).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


BLOCK = 1 << 24  # at most this many logits at once in max_per_head (64 MiB in fp32)


@dataclass
class HeadsQK:
    """Heads-first ``q`` (B, H, T, D) and ``k`` (B, H, S, D), logit ``scale`` and ``keep``
    (broadcastable to (B, H, T, S), None = all attended). ``causal``: ``keep`` masks every key
    after the query's position (the T queries are the last T of the S positions)."""
    q: torch.Tensor
    k: torch.Tensor
    scale: float
    keep: torch.Tensor | None
    causal: bool = False

    def logits(self) -> torch.Tensor:
        """Scaled logits ``q k^T * scale`` (B, H, T, S), float32 or wider."""
        return (self.q @ self.k.transpose(-1, -2)).float() * self.scale

    def max_per_head(self) -> torch.Tensor:
        """Largest attended logit of each head, (H,) float: the max of ``logits()`` over the
        ``keep``-ed entries. Causal attention over 128 or more positions goes in two query
        blocks, the first skipping the keys after its last query (3/4 of the q.k^T work; more
        blocks, or two below 128 positions, cost more in per-op overhead than they save at the
        sizes measured on CPU); long sequences in blocks of at most ``BLOCK`` logits. The mask is added as a 0 / -inf bias (a boolean masked_fill over the
        logits costs several times the product on CPU) and the scale is applied after the max
        (it is > 0, so rounding is monotone and the value is the same)."""
        B, H, T, _ = self.q.shape
        S = self.k.shape[-2]
        rows = min(-(-T // 2) if self.causal and T >= 128 else T, max(BLOCK // (B * H * S), 1))
        bias = None
        if self.keep is not None:
            bias = torch.zeros(self.keep.shape, dtype=self.q.dtype, device=self.q.device)
            bias.masked_fill_(~self.keep, float("-inf"))
        out = None
        for r0 in range(0, T, rows):
            r1 = min(T, r0 + rows)
            c1 = S - T + r1 if self.causal else S
            s = self.q[:, :, r0:r1] @ self.k[:, :, :c1].transpose(-1, -2)
            if bias is not None:
                s.add_(bias[..., r0:r1, :c1] if bias.shape[-2] > 1 else bias[..., :c1])
            m = s.amax(dim=(0, 2, 3))
            out = m if out is None else torch.maximum(out, m)
        return out.float() * self.scale


def _heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = t.shape
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)


def _causal(T: int, S: int, device, window: int | None = None) -> torch.Tensor:
    """Query i (of the last T positions of S) sees keys j <= i (and j > i - window)."""
    i = torch.arange(S - T, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    keep = j <= i
    return keep & (j > i - window) if window else keep


def _hf_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF attention masks: bool (True = attend) or additive float (large negative = masked);
    2-D (B, S) padding masks become (B, 1, 1, S)."""
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return keep[:, None, None, :] if keep.ndim == 2 else keep


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b


def _rotary(module: nn.Module):
    """The model file's own ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2/3 ... each ship one),
    else the rotate-half form they share (Su et al. 2021, RoFormer eq. 34)."""
    fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def apply(q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    return apply


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _toolkit(module, args, kwargs, raw):
    if raw is None:
        q, k, _ = module.qkv(args[0])
    else:
        C = raw["qk"].shape[-1] // 3
        q, k = (_heads(t, module.n_head) for t in raw["qk"].split(C, dim=2)[:2])
    T = q.shape[-2]
    scale = getattr(module, "scaling", q.shape[-1] ** -0.5)  # muP / u-muP: mult / d_head
    return HeadsQK(q, k, scale, _causal(T, T, q.device), causal=True)


def _mha(module, args, kwargs, raw):
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    E, H = module.embed_dim, module.num_heads
    w, b = module.in_proj_weight, module.in_proj_bias
    q = _heads(F.linear(query, w[:E], None if b is None else b[:E]), H)
    k = _heads(F.linear(key, w[E:2 * E], None if b is None else b[E:2 * E]), H)
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
    if kwargs.get("is_causal"):
        keep = keep.tril()
    causal = bool(kwargs.get("is_causal")) and q.shape[-2] == k.shape[-2]
    mask = kwargs.get("attn_mask")
    if mask is not None:  # torch convention: True / -inf = not allowed
        keep = keep & (~mask if mask.dtype == torch.bool else torch.isfinite(mask))
    pad = kwargs.get("key_padding_mask")
    if pad is not None:
        pad = ~pad if pad.dtype == torch.bool else torch.isfinite(pad)
        keep = keep & pad[:, None, None, :]
    return HeadsQK(q, k, 1 / math.sqrt(E // H), keep, causal)


def _llama_style(module, args, kwargs, raw):
    if raw is None:
        x = _hidden(args, kwargs)
        raw = {"q": module.q_proj(x), "k": module.k_proj(x)}
    B, T, _ = raw["q"].shape
    hd = module.head_dim
    q, k = raw["q"].view(B, T, -1, hd), raw["k"].view(B, T, -1, hd)
    if hasattr(module, "q_norm"):  # Qwen3 / OLMo2-style per-head norms before rotary
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = kwargs.get("position_embeddings")
    if pos is None and len(args) > 1:
        pos = args[1]
    if pos is not None:
        q, k = _rotary(module)(q, k, *pos)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    keep = _hf_mask(kwargs.get("attention_mask"))
    causal = getattr(module, "is_causal", True)
    if causal:
        keep = _and(keep, _causal(T, T, q.device, getattr(module, "sliding_window", None)))
    return HeadsQK(q, k, getattr(module, "scaling", hd ** -0.5), keep, causal)


def _gpt2(module, args, kwargs, raw):
    qkv = module.c_attn(_hidden(args, kwargs)) if raw is None else raw["qk"]
    q, k, _ = qkv.split(module.split_size, dim=2)
    q, k = _heads(q, module.num_heads), _heads(k, module.num_heads)
    scale = getattr(module, "scaling", None)  # head_dim^-0.5, / (layer + 1) if so configured
    if scale is None:
        scale = q.shape[-1] ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    T = q.shape[-2]
    return HeadsQK(q, k, scale, _and(_causal(T, T, q.device),
                                     _hf_mask(kwargs.get("attention_mask"))), causal=True)


def _bert(module, args, kwargs, raw):
    if raw is None:
        x = _hidden(args, kwargs)
        raw = {"q": module.query(x), "k": module.key(x)}
    H = module.num_attention_heads
    q, k = _heads(raw["q"], H), _heads(raw["k"], H)
    keep = _hf_mask(args[1] if len(args) > 1 else kwargs.get("attention_mask"))
    causal = getattr(module, "is_causal", False)
    if causal:
        T = q.shape[-2]
        keep = _and(keep, _causal(T, T, q.device))
    return HeadsQK(q, k, getattr(module, "scaling", q.shape[-1] ** -0.5), keep, causal)


def _layout(module: nn.Module):
    """(adapter, projection sub-modules by role) for ``module``; roles "qk" (a fused layer whose
    output starts with the query then key features) or "q" and "k"; None if unknown."""
    if callable(getattr(module, "qkv", None)) and isinstance(getattr(module, "c_attn", None),
                                                              nn.Module):
        return _toolkit, {"qk": module.c_attn}
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
        return _mha, {}
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj")) \
            and hasattr(module, "head_dim"):
        return _llama_style, {"q": module.q_proj, "k": module.k_proj}
    if hasattr(module, "c_attn") and hasattr(module, "split_size"):  # Hugging Face GPT-2
        return _gpt2, {"qk": module.c_attn}
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key")):
        return _bert, {"q": module.query, "k": module.key}  # Hugging Face BERT-style
    return None


def attention_qk(module: nn.Module, args: tuple, kwargs: dict,
                 raw: dict[str, torch.Tensor] | None = None) -> HeadsQK | None:
    """The module's heads-first q/k, logit scale and keep-mask from its forward's ``args`` and
    ``kwargs``; ``raw`` holds its projection layers' outputs when already computed (see
    :func:`watch_attention`), else they are recomputed from ``args``. None for unknown layouts."""
    found = _layout(module)
    return None if found is None else found[0](module, args, kwargs, raw)


def attention_logits(module: nn.Module, args: tuple, kwargs: dict
                     ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Scaled attention logits (B, H, T, S) and a keep-mask from an attention module's
    inputs, for the layouts listed in the module docstring; None for others."""
    qk = attention_qk(module, args, kwargs)
    return None if qk is None else (qk.logits(), qk.keep)


def watch_attention(module: nn.Module, fn: Callable[[HeadsQK], None]) -> list | None:
    """Call ``fn(HeadsQK)`` (under no_grad, detached) after every training-mode forward of
    ``module``, built from the outputs its own query/key projection layers produced in that
    forward: no projection is recomputed. ``nn.MultiheadAttention`` (no projection layers) and
    a forward that bypassed them fall back to recomputing them from the module's inputs.
    Returns the hook handles (remove them to stop), or None for an unknown layout."""
    found = _layout(module)
    if found is None:
        return None
    adapter, projections = found
    raw: dict[str, torch.Tensor] = {}

    def keep_output(role):
        def hook(_, __, out):
            if module.training:
                raw[role] = out.detach()
        return hook

    def done(mod, args, kwargs, out):
        if not mod.training:
            return
        got = dict(raw) if projections and len(raw) == len(projections) else None
        raw.clear()
        with torch.no_grad():
            fn(adapter(mod, args, kwargs, got))

    handles = [p.register_forward_hook(keep_output(role)) for role, p in projections.items()]
    return handles + [module.register_forward_hook(done, with_kwargs=True)]
