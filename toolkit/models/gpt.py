"""A small GPT in the nanoGPT mould: pre-norm blocks, causal SDPA, untied head.

The blocks live in one ``nn.ModuleList`` (``GPT.blocks``): each block's output is the
residual stream that monitors hook, and param-group rules find hidden matrices there.
``parametrization`` picks sp (default), muP or u-muP (:mod:`toolkit.models.parametrization`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import parametrization as P
from . import unit_ops as U
from .moe import MoEConfig, MoEMLP


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    # depth-muP (HyperP, Bordelon et al.): multiply each residual branch by
    # 1/sqrt(2*n_layer) so updates to the stream stay O(1) as depth grows.
    depth_mup: bool = False
    # None: dense MLPs. A dict of MoEConfig's fields (n_experts, top_k, shared_expert, gate,
    # expert_hidden, aux_loss_weight) puts a MoEMLP in every block (toolkit/models/moe.py).
    moe: Any = None
    # "sp" | "mup" | "umup" (toolkit/models/parametrization.py); the multipliers below are
    # u-muP's named hyperparameters (arXiv 2407.17465, Table 3; 1.0 is the paper's default).
    parametrization: str = "sp"
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    attn_softmax_mult: float = 1.0
    ffn_act_mult: float = 1.0
    output_mult: float = 1.0
    mup_base_width: int = 64  # muP's base width (mup only)
    fp8: bool = False  # simulate FP8 matmuls in every Linear (E4M3 forward, E5M2 gradients)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        self.moe = MoEConfig.coerce(self.moe)
        P.check(self)
        if self.moe is not None:
            self.moe.hidden(4 * self.n_embd)  # checks divisibility now, with the fix named


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = P.linear(cfg, cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = P.linear(cfg, cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.parametrization, self.mult = cfg.parametrization, cfg.attn_softmax_mult
        d = cfg.n_embd // cfg.n_head
        # the logit scale, read by the stability monitor: sp 1/sqrt(d), muP 8/d, u-muP mult/d
        self.scaling = {"sp": d ** -0.5, "mup": 8 / d, "umup": self.mult / d}[self.parametrization]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads-first q, k, v of shape (B, H, T, D); monitors reuse this."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        p = self.dropout if self.training else 0.0
        if self.parametrization == "umup":
            y = U.attention(q, k, v, self.mult, p)
        elif self.parametrization == "mup":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p,
                                               scale=self.scaling)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = P.linear(cfg, cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = P.linear(cfg, 4 * cfg.n_embd, cfg.n_embd)
        self.act_mult = cfg.ffn_act_mult if cfg.parametrization == "umup" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        return self.c_proj(F.gelu(h) if self.act_mult is None else U.gelu(h, self.act_mult))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, index: int = 0):
        super().__init__()
        self.ln_1 = P.layer_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = P.layer_norm(cfg)
        self.mlp = MoEMLP(cfg.n_embd, cfg.moe, 4 * cfg.n_embd, cfg.bias) if cfg.moe else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.branch_scale = 1 / math.sqrt(2 * cfg.n_layer) if cfg.depth_mup else 1.0
        self.taus = None
        if cfg.parametrization == "umup":  # u-muP's residual rule (App. G), one tau per branch
            self.p_drop = cfg.dropout
            self.taus = U.residual_taus(cfg.n_layer, cfg.residual_mult,
                                        cfg.residual_attn_ratio)[index]
            # what each branch adds to the stream, per unit of its output (stability monitor)
            self.branch_scales = {k: t / math.sqrt(1 + t * t)
                                  for k, t in zip(("attn_rms", "mlp_rms"), self.taus)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.taus is not None:
            return self._unit_forward(x)
        x = x + self.branch_scale * self.drop(self.attn(self.ln_1(x)))
        return x + self.branch_scale * self.drop(self.mlp(self.ln_2(x)))

    def _unit_forward(self, x: torch.Tensor) -> torch.Tensor:
        for tau, norm, branch in zip(self.taus, (self.ln_1, self.ln_2), (self.attn, self.mlp)):
            h, skip = U.residual_split(x, tau)
            x = U.residual_add(U.dropout(branch(norm(h)), self.p_drop, self.training), skip, tau)
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = P.embedding(cfg, cfg.vocab_size)
        self.wpe = P.embedding(cfg, cfg.block_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = P.layer_norm(cfg)
        self.lm_head = P.linear(cfg, cfg.n_embd, cfg.vocab_size, readout=True, bias=False)
        if cfg.parametrization != "sp":
            P.init_and_tag(self, cfg)
            return
        self.apply(self._init)
        # GPT-2's scaled init of residual projections, unless depth-muP already scales them.
        if not cfg.depth_mup:
            for name, p in self.named_parameters():
                if name.endswith(("c_proj.weight", "mlp.w_out", "mlp.shared.2.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def moe_layers(self) -> list[MoEMLP]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoEMLP)]

    def aux_loss(self) -> torch.Tensor | None:
        """Sum over MoE layers of the last forward's load-balancing loss (None when dense)."""
        layers = self.moe_layers()
        return torch.stack([m.aux_loss for m in layers]).sum() if layers else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        # Positions indexed per example (B, T), not (T,): per-example gradients (DP-SGD)
        # need every module's input to carry the batch dimension.
        pos = torch.arange(T, device=idx.device).expand(idx.shape[0], T)
        if self.cfg.parametrization == "umup":
            x = U.dropout(U.add(self.wte(idx), self.wpe(pos)), self.cfg.dropout, self.training)
        else:
            x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if self.cfg.parametrization == "umup" and self.cfg.output_mult != 1:
            # forward-only, as u-muP's loss-softmax multiplier: the logit gradient stays unit
            logits = U.scaled(logits, fwd=self.cfg.output_mult)
        return logits
