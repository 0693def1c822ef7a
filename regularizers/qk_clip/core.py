"""QK-clip, the weight-level logit cap of MuonClip (Kimi Team 2025, "Kimi K2: Open Agentic
Intelligence", arXiv 2507.20534, Sec. 2.1 and Algorithm 1).

For attention head h with largest pre-softmax logit ``S_max^h = max_{i,j} q_i^h . k_j^h * scale``
on a batch, and ``gamma_h = tau / S_max^h`` when ``S_max^h > tau``, the head's query and key
projection rows are rescaled

    W_q^h <- gamma_h^alpha W_q^h,        W_k^h <- gamma_h^(1 - alpha) W_k^h

(biases with them), so every logit of that head is multiplied by ``gamma_h``: its maximum on that
batch becomes ``tau``. With grouped-query attention a key head serves several query heads; it is
scaled by the smallest ``gamma`` of its query heads (the one with the largest logit), so each query
head's logits shrink by ``gamma_h^alpha * gamma_min^(1 - alpha) <= gamma_h``: all of them end <= tau.

The logit is the stability monitor's (:mod:`toolkit.monitors.stability.attention`,
:meth:`HeadsQK.max_per_head`: one definition of "the logit"). Two ways to measure it:

- :func:`watch_forward` + :func:`clip_measured_` (the callback's default, Kimi K2's order,
  Algorithm 1): the per-head max is taken in the step's own training forward, from the q/k
  that the attention's projection layers already produced there (forward hooks; only q.k^T and
  its max are added, no extra forward), i.e. with the weights *before* the update; the clip is
  applied after the optimizer step. A head's logit after the step is then tau times the growth
  the update gave it, so it can end somewhat above tau (the stress recipe reports by how much).
- :func:`clip_forward_` (``measure="post_step"``): after the step, one extra no-grad forward in
  which each attention module, just before it runs, measures its logits with the updated
  weights on its actual input and clips itself; later layers see the clipped earlier ones, so
  on that batch every head ends <= tau exactly (up to rounding). Costs that forward.

Layouts: the toolkit GPT's fused ``c_attn``, ``nn.MultiheadAttention`` (no projection layer to
hook: the forward watch recomputes its q/k from its inputs), Hugging Face Llama/Mistral/Qwen2-style
``q_proj``/``k_proj`` (GQA), GPT-2's fused ``Conv1D`` ``c_attn`` (stored transposed: heads are
columns) and BERT-style ``query``/``key``. Per-head q/k norms (Qwen3, OLMo2) undo any rescaling of the projection, so those
models are refused, as is anything else :func:`qk_layout` cannot map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from toolkit.monitors.layers import call_model, find_blocks, find_branch
from toolkit.monitors.stability.attention import attention_qk, watch_attention
from toolkit.monitors.stability.core import ATTN_MODULES


@dataclass
class Projection:
    """One weight (and bias) holding query and/or key rows: ``q_at``/``k_at`` are the offsets of
    the query / key features along the output dim ``dim`` (0 for Linear, 1 for Conv1D)."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    dim: int
    q_at: int | None = None
    k_at: int | None = None


@dataclass
class QKLayout:
    projections: list[Projection]
    n_head: int  # query heads
    n_kv_head: int
    head_dim: int


def qk_layout(module: nn.Module) -> QKLayout | str:
    """Where ``module``'s per-head query and key rows are, or why QK-clip cannot act on it."""
    if callable(getattr(module, "qkv", None)) and isinstance(getattr(module, "c_attn", None), nn.Linear):
        c = module.c_attn  # toolkit CausalSelfAttention: rows [q | k | v]
        C, H = c.in_features, module.n_head
        return QKLayout([Projection(c.weight, c.bias, 0, 0, C)], H, H, C // H)
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            return "nn.MultiheadAttention with separate q/k/v weights (kdim/vdim) is not mapped"
        E, H = module.embed_dim, module.num_heads
        return QKLayout([Projection(module.in_proj_weight, module.in_proj_bias, 0, 0, E)], H, H,
                        E // H)
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj")) \
            and hasattr(module, "head_dim"):
        if hasattr(module, "q_norm") or hasattr(module, "k_norm"):
            return ("it normalizes each query/key head (q_norm/k_norm, as Qwen3), which undoes "
                    "any rescaling of q_proj/k_proj")
        q, k, hd = module.q_proj, module.k_proj, module.head_dim
        return QKLayout([Projection(q.weight, q.bias, 0, q_at=0),
                         Projection(k.weight, k.bias, 0, k_at=0)],
                        q.out_features // hd, k.out_features // hd, hd)
    if hasattr(module, "c_attn") and hasattr(module, "split_size"):  # HF GPT-2 Conv1D (in, 3C)
        c, C, H = module.c_attn, module.split_size, module.num_heads
        return QKLayout([Projection(c.weight, c.bias, 1, 0, C)], H, H, C // H)
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key")):
        H = module.num_attention_heads  # BERT-style
        q, k = module.query, module.key
        return QKLayout([Projection(q.weight, q.bias, 0, q_at=0),
                         Projection(k.weight, k.bias, 0, k_at=0)], H, H, q.out_features // H)
    return (f"{type(module).__name__} is not a known attention layout (toolkit GPT, "
            "nn.MultiheadAttention, HF Llama/Mistral/Qwen2 q_proj/k_proj, GPT-2 c_attn, BERT "
            "query/key)")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, QKLayout]]:
    """(name, module, layout) of every block's attention; ValueError naming a module it cannot
    map (or when there is none)."""
    out, bad = [], []
    for layer in find_blocks(model):
        found = find_branch(layer.module, ATTN_MODULES)
        if found is None:
            bad.append(f"{layer.name}: no attention sub-module named one of {ATTN_MODULES}")
            continue
        name, mod = f"{layer.name}.{found[0]}", found[1]
        layout = qk_layout(mod)
        if isinstance(layout, str):
            bad.append(f"{name}: {layout}")
        else:
            out.append((name, mod, layout))
    if bad:
        raise ValueError("QKClip cannot rescale the query/key heads of:\n  - " + "\n  - ".join(bad))
    return out


@torch.no_grad()
def clip_(layout: QKLayout, max_logit: torch.Tensor, tau: float, alpha: float) -> torch.Tensor:
    """Rescale the heads of ``layout`` whose ``max_logit`` exceeds ``tau`` (module doc); returns
    the per-query-head factors ``gamma`` (1 where nothing was clipped). No host sync."""
    gamma = (tau / max_logit.float()).clamp(max=1.0)
    gamma = torch.where(torch.isfinite(gamma) & (gamma > 0), gamma, torch.ones_like(gamma))
    group = layout.n_head // layout.n_kv_head
    gamma_kv = gamma.view(layout.n_kv_head, group).amin(dim=1)
    hd = layout.head_dim
    q_scale = gamma.pow(alpha).repeat_interleave(hd)
    k_scale = gamma_kv.pow(1 - alpha).repeat_interleave(hd)
    for proj in layout.projections:
        n = proj.weight.shape[proj.dim]
        scale = torch.ones(n, dtype=proj.weight.dtype, device=proj.weight.device)
        if proj.q_at is not None:
            scale[proj.q_at:proj.q_at + q_scale.numel()] = q_scale
        if proj.k_at is not None:
            scale[proj.k_at:proj.k_at + k_scale.numel()] = k_scale
        proj.weight.mul_(scale[:, None] if proj.dim == 0 else scale[None, :])
        if proj.bias is not None:
            proj.bias.mul_(scale)
    return gamma


def watch_forward(modules: list[tuple[str, nn.Module, QKLayout]], store: list) -> list:
    """Forward hooks recording each module's per-head max logit in the training forward (running
    max over the forwards they see, e.g. micro-batches) into ``store[i]``, for
    :func:`clip_measured_`: computed from the q/k the forward already projected, detached, with
    the pre-update weights (Kimi K2's order). Returns the handles."""
    if len(store) != len(modules):  # kept across micro-batches until clip_measured_ reads it
        store[:] = [None] * len(modules)

    def record(i):
        def fn(qk):
            m = qk.max_per_head()
            store[i] = m if store[i] is None else torch.maximum(store[i], m)
        return fn

    handles = []
    for i, (name, mod, _) in enumerate(modules):
        got = watch_attention(mod, record(i))
        if got is None:
            raise ValueError(f"QKClip: no attention-logit adapter for {name} "
                             f"({type(mod).__name__}); see toolkit.monitors.stability.attention")
        handles += got
    return handles


@torch.no_grad()
def clip_measured_(modules: list[tuple[str, nn.Module, QKLayout]], store: list, tau: float,
                   alpha: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clip every module by the max logits :func:`watch_forward` recorded (max over ranks under
    torch.distributed); returns (max logits, heads clipped) per module that saw a forward."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    out = []
    for (_, _, layout), m in zip(modules, store):
        if m is None:
            continue
        if distributed:
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        gamma = clip_(layout, m, tau, alpha)
        out.append((m, (gamma < 1).sum()))
    store[:] = [None] * len(modules)
    return out


@torch.no_grad()
def clip_forward_(model: nn.Module, batch, modules: list[tuple[str, nn.Module, QKLayout]],
                  tau: float, alpha: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One eval-mode forward of ``model`` on ``batch`` in which every attention module, just
    before running, measures its per-head max logit and clips itself. Returns, per module, the
    (H,) max logits before clipping and the number of heads clipped (tensors; no host sync).
    Under torch.distributed the max is taken over ranks, so replicas stay identical."""
    out, handles = [], []
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def hook_for(layout):
        def hook(module, args, kwargs):
            m = attention_qk(module, args, kwargs).max_per_head()
            if distributed:
                dist.all_reduce(m, op=dist.ReduceOp.MAX)
            gamma = clip_(layout, m, tau, alpha)
            out.append((m, (gamma < 1).sum()))
        return hook

    for _, mod, layout in modules:
        handles.append(mod.register_forward_pre_hook(hook_for(layout), with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        call_model(model, batch)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out
