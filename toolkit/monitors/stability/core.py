"""Instability indicators of HyperP ("Rethinking Language Model Scaling under Transferable
Hypersphere Optimization"): attention Z (mean over attention rows of log^2 of the softmax
normalizer), output-logit z (the same for the LM head), RMS of each attention and MLP
branch output, and the outlier percentage (share of hidden entries more than 5 standard
deviations from their token's mean over the hidden dimension).

Mixture-of-experts MLPs (a branch module with ``router_z`` and ``load``, as
``toolkit.models.MoEMLP``) add two indicators: ``router_z`` (the same log^2-normalizer statistic
on the router logits, ArchScale's ``router_z_mean``) and ``expert_load`` (the busiest expert's
share of the token-slots times the number of experts: 1 when balanced, E when one expert takes
all). ``mlp_rms`` is then the MoE output's RMS, the quantity HyperP's SqrtGate keeps constant.

The pure functions take tensors; ``StabilityProbe`` attaches them to a model with hooks;
``StabilityMonitor`` does so on logging steps only.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from ..layers import (ATTN_BRANCHES, MLP_BRANCHES, Hooks, Layer, call_model, find_branch, find_head,
                      first_tensor, resolve_layers)
from .attention import attention_logits


ATTN_MODULES = ("attn", "self_attn", "attention.self", "attention")


def softmax_z(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of (log sum_j exp(logits_j))^2; ``mask`` (bool, True = attend)
    broadcast to ``logits`` leaves entries out of their row's normalizer (a row left with no
    entry, a padded query under a causal mask, is left out of the mean)."""
    logits = logits.float()
    if mask is None:
        return torch.logsumexp(logits, dim=-1).square().mean()
    lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return lse[torch.isfinite(lse)].square().mean()  # rows attending nothing (padding) drop out


OUTLIER_K = 5.0


def outlier_share(h: torch.Tensor, k: float = OUTLIER_K) -> torch.Tensor:
    """Share of entries with |x - mean| > k * std, mean and std over the last (hidden) dim
    of each token. Constant vectors have std 0 and no outliers."""
    dev = h.float() - h.float().mean(-1, keepdim=True)
    # std from the same deviations: rounding in the mean then shifts every entry of a
    # constant vector by the same d, and |d| > k*|d| never holds.
    sd = dev.square().mean(-1, keepdim=True).sqrt()
    return (dev.abs() > k * sd).float().mean()


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().square().mean().sqrt()


class StabilityProbe:
    """Hooks measuring the HyperP indicators per block during one forward."""

    def __init__(self, model: nn.Module, layers: list[Layer], outlier_k: float = OUTLIER_K):
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
            per_branch = getattr(layer.module, "branch_scales", {})  # u-muP: tau/sqrt(1+tau^2)
            for key, found in self.branches[i].items():
                if found is not None:
                    c = per_branch.get(key, scale)
                    hooks.forward(found[1], self._once(f"{key}/layer{i}", lambda m, a, o, c=c:
                                                       c * rms(first_tensor(o))))
            mlp = self.branches[i]["mlp_rms"]
            if mlp is not None and hasattr(mlp[1], "router_z") and hasattr(mlp[1], "load"):
                hooks.forward(mlp[1], self._once(f"router_z/layer{i}", lambda m, a, o:
                                                 m.router_z))
                hooks.forward(mlp[1], self._once(f"expert_load/layer{i}", lambda m, a, o:
                                                 m.load.max() * m.load.numel() / m.load.sum()))
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
                                  "(toolkit attention, nn.MultiheadAttention, HF Llama/Mistral/"
                                  "Qwen-style q_proj/k_proj, GPT-2 and BERT-style query/key are "
                                  "supported; see toolkit.monitors.stability.attention); attn_z is not "
                                  "reported", stacklevel=2)
                return
            self.values[key] = softmax_z(*got).detach()
        return hook

    def collect(self) -> dict[str, float]:
        """Per-layer values plus ``mean`` and ``max`` over layers of each indicator."""
        out = {k: float(v) for k, v in self.values.items()}
        for name in ("attn_z", "attn_rms", "mlp_rms", "outlier_pct", "router_z", "expert_load"):
            per = [v for k, v in out.items() if k.startswith(name + "/layer")]
            if per:
                out[f"{name}/mean"], out[f"{name}/max"] = sum(per) / len(per), max(per)
        return out


@torch.no_grad()
def stability_indicators(model: nn.Module, batch, layers: str | Sequence[str] = "auto",
                         outlier_k: float = OUTLIER_K) -> dict[str, float]:
    """The HyperP indicators for one forward of ``batch`` (model in its current mode)."""
    probe = StabilityProbe(model, resolve_layers(model, layers), outlier_k)
    with Hooks() as hooks:
        probe.attach(hooks)
        call_model(model, batch)
    return probe.collect()
