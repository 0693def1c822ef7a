"""Per-module samplers: from a module's inputs and output gradient to its parameters'
per-example gradients (:mod:`.pieces`), and the modules no sampler can make exact.

Linear, HF ``Conv1D``, Conv1d/Conv2d (groups 1, any padding mode), Embedding, LayerNorm
and RMSNorm (with or without bias) have exact closed forms here; the other norms use
Opacus's registered samplers, and any other leaf module Opacus's torch.func fallback
(vmap of grad over the module's own forward). Whatever the sampler, the fit-start probe
(:mod:`.probe`) checks the result against single-example gradients before any step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from optimizers.orientation import stores_transposed

from .pieces import Dense, EmbeddingRows, LinearLike, Piece, wide

Sampler = Callable[[nn.Module, tuple, torch.Tensor], dict[nn.Parameter, Piece]]


def _trainable(p) -> bool:
    return isinstance(p, nn.Parameter) and p.requires_grad


def _bias(module, G: torch.Tensor) -> dict:
    b = getattr(module, "bias", None)
    return {b: Dense(G.sum(1))} if b is not None and _trainable(b) else {}


def _linear(module, acts, grad):
    a = acts[0]
    B = a.shape[0]
    A, G = a.reshape(B, -1, a.shape[-1]), grad.reshape(B, -1, grad.shape[-1])
    out = {module.weight: LinearLike(A, G, module.weight.shape, is_conv1d(module))} \
        if _trainable(module.weight) else {}
    return {**out, **_bias(module, G)}


def is_conv1d(module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored (in, out); the one
    test is :func:`optimizers.orientation.stores_transposed`."""
    return stores_transposed(module) and isinstance(getattr(module, "weight", None), nn.Parameter)


def _patches(x: torch.Tensor, k, d, s) -> torch.Tensor:
    """``F.unfold(x).transpose(1, 2)`` of an already padded ``x`` as strided views and one
    copy (F.unfold's CPU kernel is several times slower)."""
    v = x.unfold(2, d[0] * (k[0] - 1) + 1, s[0]).unfold(3, d[1] * (k[1] - 1) + 1, s[1])
    v = v[..., ::d[0], ::d[1]]  # (B, C, Ho, Wo, kh, kw)
    B, C, Ho, Wo = v.shape[:4]
    return v.permute(0, 2, 3, 1, 4, 5).reshape(B, Ho * Wo, -1)


def _pad_amounts(module) -> list[int]:
    """F.pad's (left, right, top, bottom) for the conv's padding, 'same' included."""
    k, d = module.kernel_size, module.dilation
    if module.padding == "valid":
        pads = [(0, 0)] * len(k)
    elif module.padding == "same":  # as torch does: the extra element goes right/bottom
        pads = [((d_ * (k_ - 1)) // 2, d_ * (k_ - 1) - (d_ * (k_ - 1)) // 2) for k_, d_ in zip(k, d)]
    else:
        pads = [(p, p) for p in module.padding]
    return [a for lr in reversed(pads) for a in lr]


def _conv(module, acts, grad):
    """The conv's own padding (zeros, reflect, replicate, circular) applied first, then
    a valid conv: its weight gradient is exactly G_i^T (patches of the padded input)."""
    x = acts[0]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, _pad_amounts(module), mode=mode)
    k, s, d = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        x, grad = x.unsqueeze(-2), grad.unsqueeze(-2)
        k, s, d = (1, *k), (1, *s), (1, *d)
    B = x.shape[0]
    A = _patches(x, k, d, s)                                             # (B, L, Cin*k*k)
    G = grad.reshape(B, grad.shape[1], -1).transpose(1, 2)               # (B, L, Cout)
    out = {module.weight: LinearLike(A, G, module.weight.shape)} if _trainable(module.weight) else {}
    return {**out, **_bias(module, G)}


def _embedding(module: nn.Embedding, acts, grad):
    idx = acts[0]
    B = idx.shape[0]
    idx = idx.reshape(B, -1)
    G = grad.reshape(B, idx.shape[1], -1)
    if module.padding_idx is not None:  # the padding row gets no gradient
        G = G * (idx != module.padding_idx)[:, :, None].to(G.dtype)
    return {module.weight: EmbeddingRows(idx, G, module.num_embeddings)} \
        if _trainable(module.weight) else {}


def _norm(module, acts, grad):
    """LayerNorm / RMSNorm: y = x_hat * w (+ b), so g_w = sum G * x_hat, g_b = sum G over
    every dim but the batch and the normalized ones (bias optional, unlike Opacus's)."""
    x, shape = acts[0], module.normalized_shape
    if isinstance(module, nn.LayerNorm):
        xh = F.layer_norm(wide(x), shape, eps=module.eps)
    else:
        xh = F.rms_norm(wide(x), shape, eps=module.eps)
    B = x.shape[0]
    G = wide(grad).reshape(B, -1, *shape).to(xh.dtype)
    out = {}
    if module.weight is not None and _trainable(module.weight):
        out[module.weight] = Dense((G * xh.reshape(B, -1, *shape)).sum(1))
    if getattr(module, "bias", None) is not None and _trainable(module.bias):
        out[module.bias] = Dense(G.sum(1))
    return out


def _opacus(module, acts, grad):
    from opacus.grad_sample import GradSampleHooks
    gs = GradSampleHooks.GRAD_SAMPLERS[type(module)](module, list(acts), grad)
    return {p: Dense(g) for p, g in gs.items() if _trainable(p)}


def _functorch(module, acts, grad):
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
    if grad.shape[0] == 0:
        return {p: Dense(p.new_zeros(0, *p.shape)) for p in module.parameters() if _trainable(p)}
    gs = ft_compute_per_sample_gradient(module, list(acts), grad)
    return {p: Dense(g) for p, g in gs.items() if _trainable(p)}


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def sampler_for(module: nn.Module) -> tuple[str, Sampler]:
    """(how, sampler) for a module that holds parameters itself."""
    from opacus.grad_sample import GradSampleHooks
    if _is_linear(module) or is_conv1d(module):
        return "linear", _linear
    if type(module) in (nn.Conv1d, nn.Conv2d) and module.groups == 1:
        return "linear", _conv
    if type(module) is nn.Embedding and not module.sparse:
        return "embedding", _embedding
    if type(module) in (nn.LayerNorm, nn.RMSNorm):
        return "norm", _norm
    if type(module) in GradSampleHooks.GRAD_SAMPLERS:
        return "opacus", _opacus
    return "functorch", _functorch


def refusal(module: nn.Module) -> str | None:
    """Why this module's per-example gradients cannot be exact and private, or None."""
    name = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (f"{name} mixes the examples of a batch and keeps data-dependent running "
                "statistics: use GroupNorm (e.g. Classifier(norm='group')) or LayerNorm")
    if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
        return (f"{name}(scale_grad_by_freq=True) divides each token's gradient by its count in "
                "the whole batch, so one example's gradient depends on the others: set "
                "scale_grad_by_freq=False")
    if isinstance(module, nn.Embedding) and module.sparse:
        return (f"{name}(sparse=True): the DP-SGD gradient carries noise on every row of the "
                "table, so it is dense and a sparse optimizer (SparseAdam) cannot take it; set "
                "sparse=False and use a dense optimizer (Adam, SGD)")
    if isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward:
        return (f"{name} is an nn.Embedding whose forward does more than a lookup (BART's "
                "scaled word and learned position embeddings, say), which no exact per-example "
                "rule here covers: freeze it (requires_grad_(False)) or use a model whose "
                "embeddings are plain nn.Embedding")
    if isinstance(module, nn.EmbeddingBag):
        return (f"{name} pools a variable number of rows per example (offsets), which no "
                "per-example rule here covers: use nn.Embedding and a masked mean or sum")
    if isinstance(module, nn.Bilinear):
        return (f"{name} has no exact per-example rule here: write it as x1^T W x2 with "
                "nn.Linear layers (e.g. Linear(in1 * in2, out) on the outer product)")
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return (f"{name}(max_norm=...) renormalizes the batch's rows of the weight in place "
                "during forward, a data-dependent write no noise covers: set max_norm=None")
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(module) or any(
            type(h).__name__ in ("WeightNorm", "SpectralNorm")
            for h in module._forward_pre_hooks.values()):
        return (f"{name} computes its weight from other tensors (weight_norm / spectral_norm / "
                "a parametrization); per-example gradients of the underlying parameters are "
                "not supported: remove the parametrization for DP training")
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return (f"{name} keeps its weights out of per-example reach: build it from nn.Linear "
                "layers (e.g. opacus.layers.DPLSTM / DPGRU / DPMultiheadAttention, which do)")
    if getattr(module, "expert_stacks", ()):
        return (f"{name} routes tokens to experts stored as 3-D stacks; no per-example sampler "
                "covers them (data-dependent dispatch defeats the torch.func fallback, and its "
                "load-balancing loss mixes the batch's examples): train a dense model "
                "(model.moe: null) under DP-SGD")
    own = [n for n, p in module.named_parameters(recurse=False)]
    if own and any(True for _ in module.children()):
        shared = {id(p) for c in module.children() for p in c.parameters()}
        if any(id(p) not in shared for p in module.parameters(recurse=False)):
            return (f"{name} holds parameters {own} itself and also has submodules: move them "
                    "into a leaf module (an nn.Linear, or a small module of their own) so "
                    "their per-example gradients can be computed")
    return None
