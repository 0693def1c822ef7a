"""A small GPT in the nanoGPT mould: pre-norm blocks, causal SDPA, untied head.

The blocks live in one ``nn.ModuleList`` (``GPT.blocks``): each block's output is the
residual stream that monitors hook, and param-group rules find hidden matrices there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        self.moe = MoEConfig.coerce(self.moe)
        if self.moe is not None:
            self.moe.hidden(4 * self.n_embd)  # checks divisibility now, with the fix named


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Heads-first q, k, v of shape (B, H, T, D); monitors reuse this."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MoEMLP(cfg.n_embd, cfg.moe, 4 * cfg.n_embd, cfg.bias) if cfg.moe else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.branch_scale = 1 / math.sqrt(2 * cfg.n_layer) if cfg.depth_mup else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.branch_scale * self.drop(self.attn(self.ln_1(x)))
        return x + self.branch_scale * self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
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
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
