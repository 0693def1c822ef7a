"""Per-example gradient norms and clipped sums from one ordinary backward pass.

DP-SGD (Abadi et al. 2016, Alg. 1) needs, for every example i, its gradient g_i, the
clip factor c_i = min(1, C / ||g_i||) and the sum  sum_i c_i g_i.  Forward hooks keep each
parameter-holding module's inputs a and a tensor hook keeps the gradient of its output
G = dL/d(out); from (a, G) every per-example quantity follows.

* Linear and Conv1d/Conv2d (groups=1) are "linear in the weight": W's per-example gradient
  is G_i^T A_i with A the (unfolded) input of shape (B, T, d).  Its norm comes from the
  ghost-norm identity ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T> (Goodfellow 2015; Li et al.
  2022) when T (d + p) < d p, else from the materialized (B, p, d) gradient; the clipped sum
  is ONE matmul  (c * G)^T A  over all B*T rows ("book-keeping", Bu et al. 2023), so the
  per-example gradients are never kept.
* Embedding: the per-example gradient is a sparse row set; its norm is
  sum_{t,s} [x_t = x_s] <G_t, G_s> and the clipped sum one ``index_add``.
* Everything else (LayerNorm, GroupNorm, RMSNorm, InstanceNorm, grouped/3-d convs ...) uses
  Opacus's registered grad samplers, and any other leaf module Opacus's torch.func
  fallback (vmap of grad over the module's own forward): exact, materialized.

Several calls of one module (weight tying, recurrence) add their per-example gradients;
for linear-like calls that is concatenation along T.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Piece:
    """One parameter's per-example gradients, in whatever form is cheapest."""

    def norm2(self) -> torch.Tensor:  # (B,) squared per-example norms
        raise NotImplementedError

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:  # sum_i c_i g_i
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:  # (B, *param.shape)
        raise NotImplementedError


@dataclass
class Dense(Piece):
    gs: torch.Tensor

    def norm2(self):
        return self.gs.flatten(1).square().sum(1)

    def weighted_sum(self, c):
        return torch.tensordot(c.to(self.gs.dtype), self.gs, dims=1)

    def materialize(self):
        return self.gs


@dataclass
class LinearLike(Piece):
    """Weight gradient G_i^T A_i with A: (B, T, d), G: (B, T, p), viewed as ``shape``."""
    A: torch.Tensor
    G: torch.Tensor
    shape: torch.Size

    def norm2(self):
        B, T, d = self.A.shape
        p = self.G.shape[-1]
        if T == 1:
            return self.A.square().sum((1, 2)) * self.G.square().sum((1, 2))
        if T * (d + p) < d * p:  # ghost norm: two (T x T) Gram matrices per example
            return (torch.bmm(self.A, self.A.transpose(1, 2))
                    * torch.bmm(self.G, self.G.transpose(1, 2))).sum((1, 2))
        return self.materialize().flatten(1).square().sum(1)

    def weighted_sum(self, c):
        p, d = self.G.shape[-1], self.A.shape[-1]
        Gc = (self.G * c.to(self.G.dtype)[:, None, None]).reshape(-1, p)
        return (Gc.T @ self.A.reshape(-1, d)).view(self.shape)

    def materialize(self):
        return torch.bmm(self.G.transpose(1, 2), self.A).view(-1, *self.shape)


@dataclass
class EmbeddingRows(Piece):
    idx: torch.Tensor  # (B, T) token ids
    G: torch.Tensor    # (B, T, p)
    num_embeddings: int

    def norm2(self):
        if self.idx.shape[1] == 1:
            return self.G.square().sum((1, 2))
        same = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.G.dtype)
        return (torch.bmm(self.G, self.G.transpose(1, 2)) * same).sum((1, 2))

    def weighted_sum(self, c):
        p = self.G.shape[-1]
        out = self.G.new_zeros(self.num_embeddings, p)
        return out.index_add_(0, self.idx.reshape(-1),
                              (self.G * c.to(self.G.dtype)[:, None, None]).reshape(-1, p))

    def materialize(self):
        B, T, p = self.G.shape
        out = self.G.new_zeros(B, self.num_embeddings, p)
        return out.scatter_add_(1, self.idx[:, :, None].expand(B, T, p), self.G)


def combine(pieces: list[Piece]) -> Piece:
    """One parameter's pieces from several calls (or modules) as one piece."""
    if len(pieces) == 1:
        return pieces[0]
    if all(isinstance(q, LinearLike) for q in pieces):
        return LinearLike(torch.cat([q.A for q in pieces], 1), torch.cat([q.G for q in pieces], 1),
                          pieces[0].shape)
    return Dense(sum(q.materialize() for q in pieces))


# ---------------------------------------------------------------- per-module samplers
Sampler = Callable[[nn.Module, tuple, torch.Tensor], dict[nn.Parameter, Piece]]


def _bias(module, G: torch.Tensor) -> dict:
    b = getattr(module, "bias", None)
    return {b: Dense(G.sum(1))} if b is not None and b.requires_grad else {}


def _linear(module: nn.Linear, acts, grad):
    a = acts[0]
    B = a.shape[0]
    A, G = a.reshape(B, -1, a.shape[-1]), grad.reshape(B, -1, grad.shape[-1])
    out = {module.weight: LinearLike(A.to(G.dtype), G, module.weight.shape)} \
        if module.weight.requires_grad else {}
    return {**out, **_bias(module, G)}


def _patches(x: torch.Tensor, k, d, p, s) -> torch.Tensor:
    """``F.unfold(x).transpose(1, 2)`` as strided views and one copy (F.unfold's CPU
    kernel is several times slower)."""
    x = F.pad(x, (p[1], p[1], p[0], p[0]))
    v = x.unfold(2, d[0] * (k[0] - 1) + 1, s[0]).unfold(3, d[1] * (k[1] - 1) + 1, s[1])
    v = v[..., ::d[0], ::d[1]]  # (B, C, Ho, Wo, kh, kw)
    B, C, Ho, Wo = v.shape[:4]
    return v.permute(0, 2, 3, 1, 4, 5).reshape(B, Ho * Wo, -1)


def _conv(module: nn.Conv1d | nn.Conv2d, acts, grad):
    x = acts[0]
    if isinstance(module, nn.Conv1d):
        x, grad = x.unsqueeze(-2), grad.unsqueeze(-2)
        k, s, d, p = ((1, *module.kernel_size), (1, *module.stride), (1, *module.dilation),
                      (0, *module.padding))
    else:
        k, s, d, p = module.kernel_size, module.stride, module.dilation, module.padding
    B = x.shape[0]
    A = _patches(x, k, d, p, s)                                          # (B, L, Cin*k*k)
    G = grad.reshape(B, grad.shape[1], -1).transpose(1, 2)               # (B, L, Cout)
    out = {module.weight: LinearLike(A.to(G.dtype), G, module.weight.shape)} \
        if module.weight.requires_grad else {}
    return {**out, **_bias(module, G)}


def _embedding(module: nn.Embedding, acts, grad):
    idx = acts[0]
    B = idx.shape[0]
    idx = idx.reshape(B, -1)
    G = grad.reshape(B, idx.shape[1], -1)
    if module.padding_idx is not None:  # the padding row gets no gradient
        G = G * (idx != module.padding_idx)[:, :, None].to(G.dtype)
    return {module.weight: EmbeddingRows(idx, G, module.num_embeddings)} \
        if module.weight.requires_grad else {}


def _conv_ok(m) -> bool:
    return (m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _opacus(module, acts, grad):
    from opacus.grad_sample import GradSampleHooks
    gs = GradSampleHooks.GRAD_SAMPLERS[type(module)](module, list(acts), grad)
    return {p: Dense(g) for p, g in gs.items() if p.requires_grad}


def _functorch(module, acts, grad):
    from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
    if grad.shape[0] == 0:
        return {p: Dense(p.new_zeros(0, *p.shape)) for p in module.parameters() if p.requires_grad}
    gs = ft_compute_per_sample_gradient(module, list(acts), grad)
    return {p: Dense(g) for p, g in gs.items() if p.requires_grad}


def sampler_for(module: nn.Module) -> tuple[str, Sampler]:
    """(how, sampler) for a module that holds trainable parameters itself."""
    from opacus.grad_sample import GradSampleHooks
    if type(module) is nn.Linear:
        return "linear", _linear
    if type(module) in (nn.Conv1d, nn.Conv2d) and _conv_ok(module):
        return "linear", _conv
    if type(module) is nn.Embedding and not module.sparse and module.max_norm is None:
        return "embedding", _embedding
    if type(module) in GradSampleHooks.GRAD_SAMPLERS:
        return "opacus", _opacus
    return "functorch", _functorch


@dataclass
class _Call:
    acts: tuple
    grad: torch.Tensor | None = None


class PerSampleGradients:
    """Hooks on every module that holds trainable parameters; after one backward of a
    loss over a batch, :meth:`pieces` gives each parameter's per-example gradients.

    ``loss_reduction="mean"`` (the usual ``F.cross_entropy``) scales the output gradient
    by the batch size so that piece i is the gradient of example i's own loss.
    Example independence (no BatchNorm ...) is checked separately (:mod:`.validate`).
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: choose 'mean' or 'sum'")
        self.model, self.reduction = model, loss_reduction
        self.params: list[nn.Parameter] = []
        self.how: dict[str, str] = {}
        self._calls: dict[nn.Module, list[_Call]] = {}
        self._handles = []
        self._names: dict[nn.Module, str] = {}
        self.capturing = False
        seen = set()
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            how, fn = sampler_for(m)
            self.how[name or type(m).__name__] = how
            self._names[m] = name or type(m).__name__
            self._calls[m] = []
            self._handles.append(m.register_forward_hook(self._forward_hook(fn)))
            for p in own:
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)
        self._samplers = {}

    def _forward_hook(self, fn: Sampler):
        def hook(module, inputs, output):
            if not self.capturing or not torch.is_grad_enabled():
                return
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"{type(module).__name__} returns {type(output).__name__}; "
                                "per-example gradients need modules with parameters to return "
                                "one tensor (wrap the parameters in a leaf module)")
            if not output.requires_grad:
                return
            call = _Call(tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs))
            self._calls[module].append(call)
            self._samplers[module] = fn

            def grad_hook(g):
                g = g.detach()
                call.grad = g * g.shape[0] if self.reduction == "mean" else g
            output.register_hook(grad_hook)
        return hook

    @contextlib.contextmanager
    def capture(self):
        """Record the forward/backward inside the block (clears earlier records)."""
        self.clear()
        self.capturing = True
        try:
            yield self
        finally:
            self.capturing = False

    def clear(self) -> None:
        for calls in self._calls.values():
            calls.clear()

    def pieces(self) -> dict[nn.Parameter, Piece]:
        per_param: dict[nn.Parameter, list[Piece]] = {}
        sizes: dict[int, list[str]] = {}
        for m, calls in self._calls.items():
            for call in calls:
                if call.grad is None or call.grad.shape[0] == 0:  # unused output / empty batch
                    continue
                sizes.setdefault(call.grad.shape[0], []).append(self._names[m])
                for p, piece in self._samplers[m](m, call.acts, call.grad).items():
                    per_param.setdefault(p, []).append(piece)
        if len(sizes) > 1:
            B = max(sizes, key=lambda b: len(sizes[b]))
            odd = sorted(n for b, names in sizes.items() if b != B for n in names)
            raise ValueError(f"modules {odd} were called on inputs whose first dimension is not "
                             f"the batch ({B} examples): per-example gradients need every "
                             "parameterized module to see a batch-first input (index a position "
                             "embedding with a (B, T) tensor, not arange(T))")
        return {p: combine(v) for p, v in per_param.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
