"""Unit-scaled ops of u-muP (Blake et al., "u-muP: The Unit-Scaled Maximal Update
Parametrization", ICLR 2025, arXiv 2407.17465, Sec. 4 and Table 3; Blake et al. 2023 "Unit
Scaling" for the separate forward/backward scales).

Every op multiplies its output by a constant chosen so that unit-variance inputs give a
unit-variance output, and scales the gradients flowing back by constants chosen the same way
for gradients. ``scaled(x, fwd, bwd)`` is the primitive: ``fwd * x`` forward, ``bwd * grad``
backward. Where the two differ the gradient is a constant multiple of the true one, which
Adam and Muon ignore (they are invariant to a per-tensor gradient scale) but which keeps the
gradients near 1, where FP8 can hold them. The scales are the ones of the reference package
``unit_scaling`` (tests/test_umup.py checks each forward against it); this is an independent
implementation so the toolkit's modules keep plain ``nn.Parameter`` weights (checkpoints,
FSDP2, monitors and compile see ordinary tensors).

``fp8_forward``/``fp8_backward`` simulate FP8 matmuls (paper Sec. 4.6 and 5.3): operands cast to
E4M3 forward, gradients to E5M2 backward, saturating at each format's largest value.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd: float, bwd: float):
        ctx.bwd = bwd
        return x * fwd if fwd != 1 else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.bwd if ctx.bwd != 1 else g), None, None


def scaled(x: torch.Tensor, fwd: float = 1.0, bwd: float = 1.0) -> torch.Tensor:
    """``fwd * x`` in the forward pass, ``bwd * grad`` in the backward pass."""
    return _Scaled.apply(x, fwd, bwd)


def log_interp(alpha: float, lower: float, upper: float) -> float:
    """Geometric interpolation ``lower^(1-alpha) * upper^alpha`` (the paper's empirical models
    of GELU, softmax and attention output scales, App. B)."""
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           readout: bool = False, fp8: bool = False) -> torch.Tensor:
    """Unit-scaled ``x @ w.T (+ b)``: the output times ``1/sqrt(fan_in)`` (hidden: A_W of
    Table 3) or ``1/fan_in`` (``readout``: muP's output multiplier); the input gradient times
    ``1/sqrt(fan_in)`` (hidden; the same as forward) or ``1/sqrt(fan_out)`` (readout, so the
    gradient into the network is unit-scaled), weight/bias gradients times ``1/sqrt(batch)``.
    ``fp8``: the matmul's operands in E4M3 and its output gradient in E5M2, unscaled (the
    unit scales are what keep them in range)."""
    fan_out, fan_in = w.shape
    gw = (x.numel() // fan_in) ** -0.5
    out_scale = 1 / fan_in if readout else fan_in ** -0.5
    x = scaled(x, bwd=fan_out ** -0.5 if readout else out_scale)
    w, b = scaled(w, bwd=gw), None if b is None else scaled(b, bwd=gw)
    y = fp8_matmul(x, w, b) if fp8 else F.linear(x, w, b)
    return scaled(y, fwd=out_scale)


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with simulated FP8: E4M3 operands, E5M2 output gradient."""
    return fp8_backward(F.linear(fp8_forward(x), fp8_forward(w), b))


def embedding(idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Lookup with the weight gradient times ``sqrt(num_embeddings / lookups)``."""
    return F.embedding(idx, scaled(w, bwd=(w.shape[0] / idx.numel()) ** 0.5))


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a + b) / sqrt(2)``: unit-variance sum of two independent unit-variance tensors."""
    return (a + b) * 2 ** -0.5


def layer_norm(x: torch.Tensor, shape, weight, bias, eps: float) -> torch.Tensor:
    """LayerNorm whose gain/bias gradients are times ``sqrt(normalized size / numel)``."""
    s = (math.prod(shape) / x.numel()) ** 0.5
    weight = None if weight is None else scaled(weight, bwd=s)
    bias = None if bias is None else scaled(bias, bwd=s)
    return F.layer_norm(x, shape, weight, bias, eps)


def gelu(x: torch.Tensor, mult: float = 1.0) -> torch.Tensor:
    """``gelu(mult * x) / mult`` times the inverse of its output std for unit input (App. B's
    interpolation between the linear and the ReLU-like regimes), forward and backward."""
    s = log_interp(1 / (1 + 0.25 / mult ** 2), 2.0, (2 / (1 - 1 / math.pi)) ** 0.5)
    y = F.gelu(x * mult) / mult if mult != 1 else F.gelu(x)
    return y * s


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) * (1 - p) ** 0.5 if p else x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mult: float = 1.0,
              dropout_p: float = 0.0, is_causal: bool = True) -> torch.Tensor:
    """Causal SDPA with logits ``mult * q.k / d_head`` (muP's 1/d_head, times u-muP's
    ``attn_softmax_mult``), output and q/k/v gradients scaled by the inverse of the empirical
    output std (App. B: between ``sqrt(log(T)/T)`` for flat causal attention and 1)."""
    *_, T, d = v.shape
    flat = ((math.log(T) if is_causal else 1) / T) ** 0.5
    s = (1 - dropout_p) ** 0.5 / log_interp(1 / (1 + 4 * d / mult ** 2), flat, 1.0)
    q, k, v = (scaled(t, bwd=s) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal,
                                       scale=mult / d)
    return scaled(y, fwd=s)


def residual_split(x: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(branch input, skip) of a residual block with branch weight ``tau``: identity forward;
    gradients times ``tau / sqrt(1+tau^2)`` and ``1 / sqrt(1+tau^2)`` (App. G)."""
    d = (1 + tau ** 2) ** 0.5
    return scaled(x, bwd=tau / d), scaled(x, bwd=1 / d)


def residual_add(branch: torch.Tensor, skip: torch.Tensor, tau: float) -> torch.Tensor:
    """``(tau * branch + skip) / sqrt(1 + tau^2)``, unit variance for unit inputs."""
    d = (1 + tau ** 2) ** 0.5
    return scaled(branch, fwd=tau / d) + scaled(skip, fwd=1 / d)


def residual_taus(n_layer: int, residual_mult: float = 1.0, residual_attn_ratio: float = 1.0
                  ) -> list[tuple[float, float]]:
    """(attention tau, MLP tau) per block from u-muP's residual rule (App. G): each of the 2L
    branches adds a fixed share of the stream's variance, the attention and MLP branches
    together ``residual_mult^2`` times the embedding's, attention ``residual_attn_ratio^2``
    times an MLP's."""
    a_mlp = residual_mult * (2 / (1 + residual_attn_ratio ** 2)) ** 0.5
    a_attn = residual_attn_ratio * a_mlp
    out = []
    for i in range(2 * n_layer):
        n_attn, n_mlp = (i + 1) // 2, i // 2
        a = a_attn if i % 2 == 0 else a_mlp
        out.append(a / (n_layer + n_attn * a_attn ** 2 + n_mlp * a_mlp ** 2) ** 0.5)
    return list(zip(out[0::2], out[1::2]))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy (the same value as ``F.cross_entropy``) whose gradient to the
    logits is unit-scaled: ``(softmax - onehot) * V / sqrt(V - 1)`` per token, not divided by
    the token count."""
    logits = logits.reshape(-1, logits.shape[-1])
    V, n = logits.shape[-1], logits.shape[0]
    logits = scaled(logits, bwd=V / (V - 1) ** 0.5)
    return scaled(F.cross_entropy(logits, target.reshape(-1), reduction="sum"), fwd=1 / n)


E4M3_MAX, E5M2_MAX = 448.0, 57344.0


def _to_fp8(x: torch.Tensor, dtype: torch.dtype, top: float) -> torch.Tensor:
    return x.clamp(-top, top).to(dtype).to(x.dtype)


class _FP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fwd: bool):
        ctx.fwd = fwd
        return _to_fp8(x, torch.float8_e4m3fn, E4M3_MAX) if fwd else x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g if ctx.fwd else _to_fp8(g, torch.float8_e5m2, E5M2_MAX)), None


def fp8_forward(x: torch.Tensor) -> torch.Tensor:
    """Round to E4M3 forward (saturating at 448), pass the gradient through unchanged."""
    return _FP8.apply(x, True)


def fp8_backward(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; round the gradient to E5M2 (saturating at 57344)."""
    return _FP8.apply(x, False)
