"""Attention logits recomputed from an attention module's inputs, for the stability monitor's
attention Z (HyperP; Ren et al., "Rethinking Language Model Scaling under Transferable
Hypersphere Optimization": Z = mean over attention rows of (log sum_j exp l_ij)^2).

``attention_logits(module, args, kwargs)`` returns the scaled logits ``l = q k^T * scale``
(B, H, T, S) and a keep-mask (True = attended, broadcast to the logits) for:

- the toolkit's ``CausalSelfAttention`` and ``nn.MultiheadAttention``;
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

import torch
import torch.nn.functional as F
from torch import nn


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


def _llama_style(module: nn.Module, args: tuple, kwargs: dict):
    x = args[0] if args else kwargs["hidden_states"]
    B, T, _ = x.shape
    hd = module.head_dim
    q = module.q_proj(x).view(B, T, -1, hd)
    k = module.k_proj(x).view(B, T, -1, hd)
    if hasattr(module, "q_norm"):  # Qwen3 / OLMo2-style per-head norms before rotary
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = kwargs.get("position_embeddings")
    if pos is None and len(args) > 1:
        pos = args[1]
    if pos is not None:
        q, k = _rotary(module)(q, k, *pos)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention
    scale = getattr(module, "scaling", hd ** -0.5)
    logits = (q @ k.transpose(-1, -2)).float() * scale
    keep = _hf_mask(kwargs.get("attention_mask"))
    if getattr(module, "is_causal", True):
        keep = _and(keep, _causal(T, T, x.device, getattr(module, "sliding_window", None)))
    return logits, keep


def attention_logits(module: nn.Module, args: tuple, kwargs: dict
                     ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Scaled attention logits (B, H, T, S) and a keep-mask from an attention module's
    inputs, for the layouts listed in the module docstring; None for others."""
    if callable(getattr(module, "qkv", None)):  # toolkit CausalSelfAttention
        q, k, _ = module.qkv(args[0])
        T = q.shape[-2]
        scale = getattr(module, "scaling", q.shape[-1] ** -0.5)  # muP / u-muP: mult / d_head
        return q @ k.transpose(-1, -2) * scale, _causal(T, T, q.device)
    if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key", query)
        if not module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        E, H = module.embed_dim, module.num_heads
        w, b = module.in_proj_weight, module.in_proj_bias
        q = _heads(F.linear(query, w[:E], None if b is None else b[:E]), H)
        k = _heads(F.linear(key, w[E:2 * E], None if b is None else b[E:2 * E]), H)
        logits = q @ k.transpose(-1, -2) / math.sqrt(E // H)
        keep = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device)
        if kwargs.get("is_causal"):
            keep = keep.tril()
        mask = kwargs.get("attn_mask")
        if mask is not None:  # torch convention: True / -inf = not allowed
            keep = keep & (~mask if mask.dtype == torch.bool else torch.isfinite(mask))
        pad = kwargs.get("key_padding_mask")
        if pad is not None:
            pad = ~pad if pad.dtype == torch.bool else torch.isfinite(pad)
            keep = keep & pad[:, None, None, :]
        return logits, keep
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj")) \
            and hasattr(module, "head_dim"):
        return _llama_style(module, args, kwargs)
    if hasattr(module, "c_attn") and hasattr(module, "split_size"):  # Hugging Face GPT-2
        x = args[0] if args else kwargs["hidden_states"]
        q, k, _ = module.c_attn(x).split(module.split_size, dim=2)
        q, k = _heads(q, module.num_heads), _heads(k, module.num_heads)
        scale = getattr(module, "scaling", None)  # head_dim^-0.5, / (layer + 1) if so configured
        if scale is None:
            scale = q.shape[-1] ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
        T = q.shape[-2]
        keep = _and(_causal(T, T, x.device), _hf_mask(kwargs.get("attention_mask")))
        return (q @ k.transpose(-1, -2)).float() * scale, keep
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key")):
        x = args[0] if args else kwargs["hidden_states"]  # Hugging Face BERT-style
        H = module.num_attention_heads
        q, k = _heads(module.query(x), H), _heads(module.key(x), H)
        logits = q @ k.transpose(-1, -2) * getattr(module, "scaling", q.shape[-1] ** -0.5)
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        keep = _hf_mask(mask)
        if getattr(module, "is_causal", False):
            T = logits.shape[-1]
            keep = _and(keep, _causal(T, T, x.device))
        return logits, keep
    return None
