"""Instability indicators of HyperP ("Rethinking Language Model Scaling under Transferable
Hypersphere Optimization"): attention Z (mean over attention rows of log^2 of the softmax
normalizer), output-logit z (the same for the LM head), RMS of each attention and MLP
branch output, and the outlier percentage (share of hidden entries more than 5 standard
deviations from their token's mean over the hidden dimension).

The pure functions take tensors; ``StabilityProbe`` attaches them to a model with hooks;
``StabilityMonitor`` does so on logging steps only.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import StepMonitor, log_metrics
from .layers import (ATTN_BRANCHES, MLP_BRANCHES, Hooks, Layer, call_model, find_branch,
                     find_head, first_tensor, resolve_layers)

ATTN_MODULES = ("attn", "self_attn", "attention.self", "attention")


def softmax_z(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of (log sum_j exp(logits_j))^2; ``mask`` (bool, True = attend)
    broadcast to ``logits`` leaves entries out of their row's normalizer."""
    logits = logits.float()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(logits, dim=-1).square().mean()


def outlier_share(h: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """Share of entries with |x - mean| > k * std, mean and std over the last (hidden) dim
    of each token. Constant vectors have std 0 and no outliers."""
    dev = h.float() - h.float().mean(-1, keepdim=True)
    # std from the same deviations: rounding in the mean then shifts every entry of a
    # constant vector by the same d, and |d| > k*|d| never holds.
    sd = dev.square().mean(-1, keepdim=True).sqrt()
    return (dev.abs() > k * sd).float().mean()


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().square().mean().sqrt()


def _heads(t: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = t.shape
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)


def attention_logits(module: nn.Module, args: tuple, kwargs: dict
                     ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Scaled attention logits (B, H, T, S) and a keep-mask from an attention module's
    inputs, for the layouts the toolkit knows; None for others."""
    if callable(getattr(module, "qkv", None)):  # toolkit CausalSelfAttention
        q, k, _ = module.qkv(args[0])
        T = q.shape[-2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), causal
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
    if hasattr(module, "c_attn") and hasattr(module, "split_size"):  # Hugging Face GPT-2
        x = args[0] if args else kwargs["hidden_states"]
        q, k, _ = module.c_attn(x).split(module.split_size, dim=2)
        q, k = _heads(q, module.num_heads), _heads(k, module.num_heads)
        logits = q @ k.transpose(-1, -2)
        if getattr(module, "scale_attn_weights", True):
            logits = logits / math.sqrt(q.shape[-1])
        T = logits.shape[-1]
        return logits, torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key")):
        x = args[0] if args else kwargs["hidden_states"]  # Hugging Face BERT-style
        H = module.num_attention_heads
        q, k = _heads(module.query(x), H), _heads(module.key(x), H)
        logits = q @ k.transpose(-1, -2) * getattr(module, "scaling", q.shape[-1] ** -0.5)
        keep = None
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None:  # HF: bool True = attend, or additive float
            keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        if getattr(module, "is_causal", False):
            T = logits.shape[-1]
            tri = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            keep = tri if keep is None else keep & tri
        return logits, keep
    return None


class StabilityProbe:
    """Hooks measuring the HyperP indicators per block during one forward."""

    def __init__(self, model: nn.Module, layers: list[Layer], outlier_k: float = 5.0):
        self.layers, self.outlier_k = layers, outlier_k
        self.attn_mods, self.branches = [], []
        for layer in layers:
            self.attn_mods.append(find_branch(layer.module, ATTN_MODULES))
            self.branches.append({"attn_rms": find_branch(layer.module, ATTN_BRANCHES),
                                  "mlp_rms": find_branch(layer.module, MLP_BRANCHES)})
        self.head = find_head(model)
        self.values: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()

    def attach(self, hooks: Hooks) -> None:
        self.values = {}
        for i, layer in enumerate(self.layers):
            hooks.forward(layer.module, self._once(f"outlier_pct/layer{i}", lambda m, a, o, L=layer:
                                                   100 * outlier_share(L.hidden(o), self.outlier_k)))
            scale = getattr(layer.module, "branch_scale", 1.0)  # what is added to the stream
            for key, found in self.branches[i].items():
                if found is not None:
                    hooks.forward(found[1], self._once(f"{key}/layer{i}", lambda m, a, o, c=scale:
                                                       c * rms(first_tensor(o))))
            if self.attn_mods[i] is not None:
                hooks.pre(self.attn_mods[i][1], self._attn_z(i), with_kwargs=True)
        if self.head is not None:
            hooks.forward(self.head[1], self._once("logit_z", lambda m, a, o:
                                                   softmax_z(first_tensor(o))))

    def _once(self, key: str, fn):
        def hook(module, args, out):
            if key not in self.values:
                with torch.no_grad():
                    self.values[key] = fn(module, args, out).detach()
        return hook

    def _attn_z(self, i: int):
        def hook(module, args, kwargs):
            key = f"attn_z/layer{i}"
            if key in self.values:
                return
            with torch.no_grad():
                got = attention_logits(module, args, kwargs)
            if got is None:
                if type(module).__name__ not in self._warned:
                    self._warned.add(type(module).__name__)
                    warnings.warn(f"attention Z: no logits adapter for {type(module).__name__} "
                                  "(toolkit attention, nn.MultiheadAttention, HF GPT-2 and "
                                  "BERT-style query/key modules are supported); attn_z is not reported")
                return
            self.values[key] = softmax_z(*got).detach()
        return hook

    def collect(self) -> dict[str, float]:
        """Per-layer values plus ``mean`` and ``max`` over layers of each indicator."""
        out = {k: float(v) for k, v in self.values.items()}
        for name in ("attn_z", "attn_rms", "mlp_rms", "outlier_pct"):
            per = [v for k, v in out.items() if k.startswith(name + "/layer")]
            if per:
                out[f"{name}/mean"], out[f"{name}/max"] = sum(per) / len(per), max(per)
        return out


@torch.no_grad()
def stability_indicators(model: nn.Module, batch, layers: str | Sequence[str] = "auto",
                         outlier_k: float = 5.0) -> dict[str, float]:
    """The HyperP indicators for one forward of ``batch`` (model in its current mode)."""
    probe = StabilityProbe(model, resolve_layers(model, layers), outlier_k)
    with Hooks() as hooks:
        probe.attach(hooks)
        call_model(model, batch)
    return probe.collect()


class StabilityMonitor(StepMonitor):
    """Logs the HyperP indicators as ``stability/<indicator>/layer{i}`` (and ``/mean``,
    ``/max``; ``stability/logit_z``) on the training forward of every ``every_n_steps``-th
    step; no hooks exist in between."""

    def __init__(self, every_n_steps: int = 50, layers: str | list[str] = "auto",
                 outlier_k: float = 5.0):
        super().__init__(every_n_steps)
        self.layers_arg, self.outlier_k = layers, outlier_k
        self.last: dict[str, float] = {}
        self._probe: StabilityProbe | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Not in setup: LightningModules may build their model later, in configure_model.
        self._probe = StabilityProbe(pl_module, resolve_layers(pl_module, self.layers_arg),
                                         self.outlier_k)

    def start(self, trainer, pl_module, batch) -> None:
        self._probe.attach(self.hooks)

    def finish(self, trainer, pl_module, step: int) -> None:
        self.last = self._probe.collect()
        if self.last:
            log_metrics(trainer, {f"stability/{k}": v for k, v in self.last.items()}, step)
