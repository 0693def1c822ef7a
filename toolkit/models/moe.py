"""Mixture-of-experts MLP with HyperP's SqrtGate (Ren et al., "Rethinking Language Model Scaling
under Transferable Hypersphere Optimization"; reference code microsoft/ArchScale ``lit_gpt/moe.py``
and ``lit_gpt/aux_loss.py``, read, not copied).

Routing (ArchScale's ``Router``): logits ``z = x W_r^T`` (fp32), the top-k experts by logit, and
the gates ``w = softmax`` over those k logits only (softmax after top-k: the k gates sum to 1).
Each selected expert ``e`` is a GELU MLP ``y_e = W_out[e] gelu(W_in[e] x)`` and

    plain gate:  y = sum_k w_k y_k                 (+ y_shared)
    SqrtGate:    y = sum_k sqrt(w_k) y_k            (then sqrt(1/2) y + sqrt(1/2) y_shared)

Why the square root: for expert outputs that are uncorrelated with equal second moment s^2,
``E|y|^2 = s^2 sum_k g_k^2``. With ``g = sqrt(w)`` that is ``s^2 sum_k w_k = s^2`` for any k and
any gate distribution; with ``g = w`` it is ``s^2 sum_k w_k^2``, which falls towards ``s^2 / k``
as routing gets finer (more, smaller experts with larger k). The shared expert is mixed with
``sqrt(1/2)`` weights for the same reason (``1/2 + 1/2 = 1``). The RMS is then independent of the
granularity, so one set of HyperP hyperparameters transfers across it.

Granularity (ArchScale): ``n_experts = sparsity * top_k`` and each expert has hidden size
``dense_hidden / top_k`` (a shared expert counts as one of the ``top_k`` active ones), so the
active parameters equal the dense MLP's. ``expert_hidden=None`` applies that rule.

Load balancing (Switch Transformer, Fedus et al. 2021, eq. 4; ArchScale ``style="switch"``):
``aux = E * sum_e f_e P_e`` with ``f_e`` the share of the N*k token-slots routed to expert e and
``P_e`` the mean over tokens of the full softmax of the router logits; 1 at perfect balance.
The layer keeps the last forward's ``aux_loss``, per-expert ``load`` (token-slot counts) and
``router_z`` (mean squared logsumexp of the logits) for the LM loss and the monitors.

Experts are stored as 3-D stacks ``w_in (E, hidden, d)`` and ``w_out (E, d, hidden)`` (each
slice in ``nn.Linear``'s ``(fan_out, fan_in)`` layout); ``expert_stacks`` names them, and the
optimizer factory flags them so matrix optimizers treat each slice as its own matrix
(:mod:`optimizers.orientation`). Dispatch: token-slots sorted by expert, one matmul per expert
on its contiguous rows (a grouped GEMM written as a loop), results scattered back with
``index_add_``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("sqrt", "plain")


@dataclass
class MoEConfig:
    n_experts: int
    top_k: int = 2
    shared_expert: bool = False
    gate: str = "sqrt"
    expert_hidden: int | None = None  # None: dense hidden / (top_k + shared_expert)
    aux_loss_weight: float = 0.01

    def __post_init__(self):
        if not isinstance(self.n_experts, int) or self.n_experts < 1:
            raise ValueError(f"moe.n_experts={self.n_experts!r}: give a positive int, e.g. 8")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"moe.top_k={self.top_k!r} must be an int in [1, n_experts="
                             f"{self.n_experts}]: lower top_k or add experts")
        if self.gate not in GATES:
            raise ValueError(f"moe.gate={self.gate!r} is not one of {GATES}: 'sqrt' is HyperP's "
                             "SqrtGate, 'plain' the usual softmax gate")
        if self.expert_hidden is not None and (not isinstance(self.expert_hidden, int)
                                               or self.expert_hidden < 1):
            raise ValueError(f"moe.expert_hidden={self.expert_hidden!r}: give a positive int, or "
                             "null for dense_hidden / (top_k + shared_expert)")
        if not self.aux_loss_weight >= 0:
            raise ValueError(f"moe.aux_loss_weight={self.aux_loss_weight!r} must be >= 0 "
                             "(0 turns the load-balancing loss off)")

    @classmethod
    def coerce(cls, value) -> "MoEConfig | None":
        """``None``, a ``MoEConfig`` or a dict of its fields (YAML); unknown keys are named."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"moe must be a dict of {[f.name for f in fields(cls)]} or null, "
                            f"got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"moe got unknown keys {unknown}; it takes {sorted(known)}")
        if "n_experts" not in value:
            raise ValueError("moe needs n_experts, e.g. moe: {n_experts: 8, top_k: 2}")
        return cls(**value)

    def hidden(self, dense_hidden: int) -> int:
        if self.expert_hidden is not None:
            return self.expert_hidden
        active = self.top_k + int(self.shared_expert)
        if dense_hidden % active:
            raise ValueError(f"dense hidden {dense_hidden} is not divisible by the {active} active "
                             "experts (top_k + shared_expert): set moe.expert_hidden")
        return dense_hidden // active

    def to_dict(self) -> dict:
        return asdict(self)


def switch_aux_loss(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``E * sum_e f_e P_e`` (Switch Transformer eq. 4): ``logits`` (N, E), ``counts`` (E,) the
    token-slots routed to each expert. Differentiable through ``P`` only, as in Switch."""
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).mean(0)
    f = counts.to(probs.dtype) / counts.sum().clamp_min(1)
    return logits.shape[-1] * (f * probs).sum()


class MoEMLP(nn.Module):
    """Top-k routed GELU experts (3-D stacks), optional shared expert, sqrt or plain gate."""

    expert_stacks = ("w_in", "w_out")  # parameters holding one matrix per expert (dim 0)
    expert_biases = ("b_in", "b_out")  # one bias vector per expert: biases, not matrices

    def __init__(self, n_embd: int, cfg: MoEConfig, dense_hidden: int, bias: bool = False):
        super().__init__()
        self.cfg = cfg
        E, h = cfg.n_experts, cfg.hidden(dense_hidden)
        self.top_k, self.sqrt_gate, self.hidden = cfg.top_k, cfg.gate == "sqrt", h
        self.router = nn.Linear(n_embd, E, bias=False)
        self.w_in = nn.Parameter(torch.empty(E, h, n_embd))
        self.w_out = nn.Parameter(torch.empty(E, n_embd, h))
        self.b_in = nn.Parameter(torch.zeros(E, h)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(E, n_embd)) if bias else None
        self.shared = None
        if cfg.shared_expert:
            self.shared = nn.Sequential(nn.Linear(n_embd, h, bias=bias), nn.GELU(),
                                        nn.Linear(h, n_embd, bias=bias))
        for w in (self.w_in, self.w_out):
            nn.init.normal_(w, std=0.02)
        self.aux_loss: torch.Tensor | None = None
        self.load: torch.Tensor | None = None
        self.router_z: torch.Tensor | None = None

    def route(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E) in fp32 or wider, top-k expert ids (N, k) and their gates (N, k)."""
        dt = torch.promote_types(x2.dtype, torch.float32)  # bf16 routing flips near-ties
        logits = F.linear(x2.to(dt), self.router.weight.to(dt))
        top, idx = logits.topk(self.top_k, dim=-1)
        w = top.softmax(-1)
        return logits, idx, (w.sqrt() if self.sqrt_gate else w)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on rows ``x`` (n, d)."""
        h = x @ self.w_in[e].T
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = F.gelu(h) @ self.w_out[e].T
        return y + self.b_out[e] if self.b_out is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits, idx, gates = self.route(x2)
        E, k = self.cfg.n_experts, self.top_k
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)  # token-slots grouped by expert
        counts = torch.bincount(flat, minlength=E)
        token = order // k
        rows = x2[token]
        outs = [self.expert(e, r) for e, r in enumerate(rows.split(counts.tolist()))]
        ys = torch.cat(outs) * gates.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        y = torch.zeros_like(x2).index_add_(0, token, ys)
        if self.shared is not None:
            s = self.shared(x2)
            y = (y + s) * 0.5 ** 0.5 if self.sqrt_gate else y + s
        self.aux_loss = switch_aux_loss(logits, counts)
        self.load = counts.detach()
        self.router_z = torch.logsumexp(logits.detach(), -1).square().mean()
        return y.reshape(shape)
