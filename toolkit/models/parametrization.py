"""Width parametrizations of the toolkit GPT: "sp" (nanoGPT's), "mup" and "umup".

"mup" is muP for Adam (Yang et al., Tensor Programs V, arXiv 2203.03466, Table 8) relative to a
base width ``b`` (``m = n_embd / b``): embeddings as sp; hidden weights init std ``0.02 /
sqrt(m)`` and Adam lr ``lr / m``; the head's logits times ``1 / m``; attention logits
``q.k * 8 / d_head`` (the ``mup`` package's 1/d rule, equal to sp's at d_head = 64). At width b
it is sp up to the attention scale.

"umup" is u-muP (Blake et al., ICLR 2025, arXiv 2407.17465, Table 3): every weight initialized
N(0, 1); hidden matmuls scaled by ``1/sqrt(fan_in)``, the readout by ``1/fan_in``, the ops and
residual branches of :mod:`toolkit.models.unit_ops`; named hyperparameters ``residual_mult``,
``residual_attn_ratio``, ``attn_softmax_mult``, ``ffn_act_mult``, ``output_mult`` (all 1 by
default, the paper's defaults).

Each parameter's role is recorded in its module's ``param_tags`` (``{"weight": ParamTag}``),
which :func:`optimizers.parametrization.lr_groups` reads to give it its per-tensor lr. The tags
live on modules, not on the tensors, so they survive FSDP2's DTensor swap and ``deepcopy``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import unit_ops as U

PARAMETRIZATIONS = ("sp", "mup", "umup")
UMUP_MULTS = ("residual_mult", "residual_attn_ratio", "attn_softmax_mult", "ffn_act_mult",
              "output_mult")
ROLES = ("input", "hidden", "output", "norm", "bias")


@dataclass(frozen=True)
class ParamTag:
    """What the optimizer factory needs to set one tensor's lr: the parametrization, the
    tensor's role (:data:`ROLES`), the fans of its layer's map (an embedding's fan_out is its
    width), the residual depth (number of blocks) when it lives inside a block, and muP's
    width multiplier ``fan_in / base fan_in`` (1 under umup)."""
    parametrization: str
    role: str
    fan_in: int
    fan_out: int
    depth: int | None = None
    width_mult: float = 1.0


def check(cfg) -> None:
    """Config-time checks of a GPTConfig's parametrization fields, each naming the fix."""
    if cfg.parametrization not in PARAMETRIZATIONS:
        raise ValueError(f"parametrization={cfg.parametrization!r} is unknown: choose one of "
                         f"{PARAMETRIZATIONS} (sp: nanoGPT's, mup: muP, umup: u-muP)")
    for name in UMUP_MULTS:
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name}={v!r} must be a number > 0 (u-muP's default is 1.0)")
        if cfg.parametrization != "umup" and v != 1.0:
            raise ValueError(f"{name}={v} is a u-muP hyperparameter: set parametrization: umup "
                             f"or leave {name} at 1.0")
    if cfg.parametrization != "sp":
        if cfg.moe is not None:
            raise ValueError(f"parametrization={cfg.parametrization!r} is implemented for dense "
                             "MLPs only: drop moe or use parametrization: sp")
        if cfg.depth_mup:
            raise ValueError(f"depth_mup scales sp's residual branches; "
                             f"parametrization={cfg.parametrization!r} has its own depth rule: "
                             "set depth_mup: false")
    if not (isinstance(cfg.mup_base_width, int) and cfg.mup_base_width > 0):
        raise ValueError(f"mup_base_width={cfg.mup_base_width!r} must be a positive int")


class Linear(nn.Linear):
    """``nn.Linear`` under "mup"/"umup" or simulated FP8: ``mode`` "sp"/"mup" is a plain
    linear times ``mult`` (muP's readout 1/m); "umup" is :func:`unit_ops.linear`."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool, mode: str, readout: bool = False,
                 mult: float = 1.0, fp8: bool = False):
        super().__init__(fan_in, fan_out, bias=bias)
        self.mode, self.readout, self.mult, self.fp8 = mode, readout, mult, fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "umup":
            return U.linear(x, self.weight, self.bias, self.readout, self.fp8)
        y = U.fp8_matmul(x, self.weight, self.bias) if self.fp8 else super().forward(x)
        return y * self.mult if self.mult != 1 else y


class Embedding(nn.Embedding):
    """Unit-scaled lookup (u-muP): the weight gradient is unit-scaled (:func:`unit_ops.embedding`)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return U.embedding(idx, self.weight)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with unit-scaled gain/bias gradients (:func:`unit_ops.layer_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return U.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def linear(cfg, fan_in: int, fan_out: int, readout: bool = False, bias: bool | None = None
           ) -> nn.Linear:
    """The layer for ``cfg``: a plain ``nn.Linear`` under sp without FP8 (sp is unchanged)."""
    bias = cfg.bias if bias is None else bias
    if cfg.parametrization == "sp" and not cfg.fp8:
        return nn.Linear(fan_in, fan_out, bias=bias)
    mult = cfg.mup_base_width / cfg.n_embd if cfg.parametrization == "mup" and readout else 1.0
    return Linear(fan_in, fan_out, bias, cfg.parametrization, readout, mult, cfg.fp8)


def embedding(cfg, n: int) -> nn.Embedding:
    return Embedding(n, cfg.n_embd) if cfg.parametrization == "umup" else nn.Embedding(n, cfg.n_embd)


def layer_norm(cfg) -> nn.LayerNorm:
    cls = LayerNorm if cfg.parametrization == "umup" else nn.LayerNorm
    return cls(cfg.n_embd, bias=cfg.bias)


def init_and_tag(model: nn.Module, cfg) -> None:
    """Initialize ``model`` (a GPT) for "mup"/"umup" and tag every parameter's role."""
    p, L = cfg.parametrization, cfg.n_layer
    for name, m in model.named_modules():
        depth = L if name.startswith("blocks.") else None
        if isinstance(m, nn.Embedding):
            tags = {"weight": ParamTag(p, "input", m.num_embeddings, m.embedding_dim, depth)}
            nn.init.normal_(m.weight, std=1.0 if p == "umup" else 0.02)
        elif isinstance(m, nn.Linear):
            head = name == "lm_head"
            wm = cfg.n_embd / cfg.mup_base_width  # every hidden fan_in is a multiple of n_embd
            tags = {"weight": ParamTag(p, "output" if head else "hidden", m.in_features,
                                       m.out_features, depth, 1.0 if p == "umup" or head else wm)}
            if p == "umup":
                nn.init.normal_(m.weight)
            else:  # muP: hidden std 0.02/sqrt(m), sp's 1/sqrt(2L) on residual projections kept
                std = 0.02 if head else 0.02 / wm ** 0.5
                nn.init.normal_(m.weight, std=std / ((2 * L) ** 0.5 if name.endswith("c_proj")
                                                     else 1.0))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
                tags["bias"] = ParamTag(p, "bias", m.in_features, m.out_features, depth)
        elif isinstance(m, nn.LayerNorm):
            tags = {k: ParamTag(p, "norm" if k == "weight" else "bias", cfg.n_embd, cfg.n_embd,
                                depth) for k, _ in m.named_parameters(recurse=False)}
        else:
            continue
        m.param_tags = tags
