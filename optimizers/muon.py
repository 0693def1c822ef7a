"""Muon for hidden matrices plus an internal AdamW for everything else, in one optimizer.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/): Nesterov momentum,
then the update of each hidden weight matrix is replaced by its Newton-Schulz
orthogonalization ``NS_5(M)`` (quintic 3.4445, -4.7750, 2.0315). ``adjust_lr`` picks the
update scale: ``"original"`` multiplies by ``sqrt(max(1, A/B))`` (Jordan);
``"match_rms_adamw"`` by ``0.2 * sqrt(max(A, B))`` (Moonlight, Liu et al. 2025, "Muon is
Scalable for LLM Training", eq. 4), which gives the update AdamW's RMS so AdamW's lr and
weight decay carry over. Weight decay is decoupled: ``W <- (1 - lr*wd) W``.

Groups with ``use_muon=False`` get AdamW exactly as ``muon.SingleDeviceMuonWithAuxAdam``
does (betas (0.9, 0.95), eps 1e-10 by default), so results match that reference (bf16
tolerance: the NS runs in bf16 as there). Their lr is ``adam_lr`` unless the group sets
its own ``lr``: build_optimizer passes a single ``lr``, which is Muon's.

Speed: on GPUs same-shape matrices are orthogonalized in one batched call, on CPUs one by one
into reused buffers (bitwise equal either way), momentum uses ``torch._foreach_*`` ops and the
AdamW groups :mod:`optimizers.aux_adam` (bitwise the reference's ops, in cache-sized chunks on
CPUs). ``ns_matmul="addmm"`` runs torch.optim.Muon's arithmetic instead. On CPUs without bf16 units the bf16
iteration's products run as fp32 GEMMs of the bf16 operands (``ns_matmul="auto"``; see
:mod:`optimizers.newton_schulz`), faster (docs/benchmarks.md, muon-step) and within 1% of the reference. Under DDP each rank
orthogonalizes ~1/world of the matrices (see :mod:`optimizers.newton_schulz`); momentum
is kept on every rank (cheap, elementwise, identical because DDP averages gradients), so
a rank-0 checkpoint holds the full state and resumes exactly. Under FSDP2 (DTensor
parameters from ``fully_shard``) state is sharded like the parameters and each matrix's
direction is computed once, by one rank (:mod:`optimizers.sharded`); FSDP1's flat
parameters are refused.

Shapes: every scale is taken on the layer's ``(fan_out, fan_in)`` map; weights stored
``(fan_in, fan_out)`` (HF ``Conv1D``) are flagged per parameter by the factory's ``transposed``
group key (:mod:`optimizers.orientation`), and :meth:`Muon.fans` reads it. Expert stacks
``(E, fan_out, fan_in)`` (MoE layers; the factory's ``stacked`` key) are E matrices: each slice
is orthogonalized on its own (the slices join the same-shape batch) and scaled by its own shape,
as E separate ``nn.Linear`` weights would be; other >2-D weights (conv filters) are flattened.

Subclasses (HyperSphere, MuonPlusPlus, AuON) override :meth:`directions` (momentum ->
update direction) and :meth:`apply_update` (direction -> new weights).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from .registry import register
from . import sharded
from .aux_adam import adam_step
from .cautious import check_cautious, decay_
from .newton_schulz import NS_MATMULS, as_matrix, check_coefficients, orthogonalize_many
from .orientation import fans, group_flags, stacked_flags

ADJUST_LR = ("original", "match_rms_adamw")
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def adjusted_ratio(shape: torch.Size, adjust_lr: str, transposed: bool = False,
                   stacked: bool = False) -> float:
    """Update scale of torch.optim.Muon's ``adjust_lr_fn`` for a (fan_out, fan_in...) weight,
    a (fan_in, fan_out) one with ``transposed`` (HF ``Conv1D``), or each expert of a
    (E, fan_out, fan_in) stack with ``stacked``."""
    a, b = fans(shape, transposed, stacked)
    if adjust_lr == "original":
        return math.sqrt(max(1.0, a / b))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(a, b))
    raise ValueError(f"adjust_lr={adjust_lr!r} is not one of {ADJUST_LR}")


def default_adam_lr(lr: float, adam_lr: float | None, adjust_lr: str = "original") -> float:
    """The AdamW groups' lr: ``adam_lr``, else ``lr`` with ``match_rms_adamw``, else 3e-4."""
    if adam_lr is not None:
        return adam_lr
    return lr if adjust_lr == "match_rms_adamw" else 3e-4


def _is_sharded(p: torch.Tensor) -> bool:
    if getattr(p, "_fsdp_flattened", False):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(p, DTensor)


def _split_params(params: Iterable) -> list[dict[str, Any]]:
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if isinstance(params[0], dict):
        for i, g in enumerate(params):
            if "use_muon" not in g:
                raise ValueError(f"param group {i} has no 'use_muon' key: build groups with "
                                 "optimizers.param_groups(model) or mark hidden matrices "
                                 "use_muon=True and the rest use_muon=False")
        return [dict(g) for g in params]
    # Plain parameter list: matrices get Muon, vectors AdamW. Embeddings and the output
    # head should be AdamW too; only named groups (param_groups) can tell them apart.
    mats = [p for p in params if p.ndim >= 2]
    vecs = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False})
            if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon (hidden matrices, ``use_muon=True`` groups) + AdamW (other groups).

    Args:
        params: param groups with ``use_muon`` (e.g. from ``optimizers.param_groups``),
            or a plain list (matrices -> Muon, vectors -> AdamW). Extra keys are kept.
        lr: Muon learning rate (spectral-norm units for ``adjust_lr="original"``).
        momentum, nesterov, ns_steps: Muon's momentum and Newton-Schulz iterations.
        weight_decay: decoupled decay ``W <- (1 - lr*wd) W`` (groups may override).
        adjust_lr: ``"original"`` or ``"match_rms_adamw"`` (torch.optim.Muon's adjust_lr_fn).
        ns_dtype: ``"bfloat16"`` (the reference iteration, bitwise) or ``"float32"`` (the same
            quintic in fp32: faster on CPUs without bf16 matmul units, and closer to
            the exact iteration; matches the reference to bf16 tolerance).
        ns_matmul: how bf16 products are computed: ``"bf16"`` (the reference function,
            bitwise), ``"fp32"`` (fp32 GEMMs of the bf16 operands, rounded to bf16: same
            numerics up to accumulation order, faster on CPUs without bf16 units),
            ``"auto"`` (``"bf16"`` on GPUs and bf16-capable CPUs, else ``"fp32"``) or
            ``"addmm"``: bf16 GEMMs in torch.optim.Muon's form, the scalings folded into
            ``addmm`` (bitwise torch.optim.Muon's iteration and, with the ratio folded into the
            step size as there, its whole update; faster on CPUs, where bf16 elementwise ops are
            slow; not bitwise the muon package, whose form rounds each scaling separately).
        ns_coefficients: ``"quintic"`` (Jordan's 3.4445, -4.7750, 2.0315 every iteration) or
            ``"polar_express"`` (Amsel et al. 2025, arXiv 2505.16932: one optimal quintic per
            iteration; :mod:`optimizers.newton_schulz`).
        cautious_wd: decay only the coordinates where the update and the weight share a sign
            (Chen et al. 2025, arXiv 2510.12402; :mod:`optimizers.cautious`), in every group.
        adam_lr: lr of the AdamW groups; default ``lr`` with ``match_rms_adamw`` (that is
            its point), else the reference package's 3e-4.
        betas, eps: the AdamW groups' (reference defaults (0.9, 0.95), 1e-10).
    """

    refused_options: dict[str, str] = {}  # inherited options a subclass does not use

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, adjust_lr: str = "original",
                 adam_lr: float | None = None, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-10, ns_dtype: str = "bfloat16", ns_matmul: str = "auto",
                 ns_coefficients: str = "quintic", cautious_wd: bool = False):
        if lr < 0 or (adam_lr is not None and adam_lr < 0):
            raise ValueError(f"learning rates must be >= 0, got lr={lr}, adam_lr={adam_lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        adjusted_ratio(torch.Size([1, 1]), adjust_lr)  # validates the name
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype={ns_dtype!r} is not one of {sorted(NS_DTYPES)}")
        if ns_matmul not in NS_MATMULS:
            raise ValueError(f"ns_matmul={ns_matmul!r} is not one of {NS_MATMULS}")
        check_coefficients(ns_coefficients)
        check_cautious(cautious_wd)
        adam_lr = default_adam_lr(lr, adam_lr, adjust_lr)
        groups = _split_params(params)
        for g in groups:
            if not g["use_muon"]:
                g.setdefault("lr", adam_lr)
            g["params"] = list(g["params"])
            for p in g["params"]:
                if g["use_muon"] and p.ndim < 2 and not _is_sharded(p):
                    raise ValueError(f"a use_muon group holds a parameter of shape "
                                     f"{tuple(p.shape)}; Muon only takes matrices (and conv "
                                     "filters), put vectors in a use_muon=False group")
        self._transposed: set[int] = set()  # ids of (fan_in, fan_out) weights, see fans()
        self._stacked: set[int] = set()  # ids of (E, fan_out, fan_in) expert stacks
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, adjust_lr=adjust_lr, betas=tuple(betas),
                        eps=eps, ns_dtype=ns_dtype, ns_matmul=ns_matmul,
                        ns_coefficients=ns_coefficients, cautious_wd=cautious_wd)
        super().__init__(groups, defaults)
        self._sharded = sharded.setup(self)  # FSDP2 DTensors: validated, state created now
        if self._sharded and self._stacked:
            raise ValueError("expert stacks (MoE layers) under FSDP2 are not supported by the "
                             "matrix optimizers yet: train MoE models with strategy ddp or one device")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        g["transposed"] = group_flags(g)
        self._transposed |= {id(p) for p, t in zip(g["params"], g["transposed"]) if t}
        g["stacked"] = stacked_flags(g)
        self._stacked |= {id(p) for p, t in zip(g["params"], g["stacked"]) if t}

    def fans(self, p: torch.Tensor) -> tuple[int, int]:
        """``(fan_out, fan_in)`` of ``p`` (of each expert for a stack), whichever way it is stored
        (see optimizers.orientation)."""
        return fans(p.shape, id(p) in self._transposed, id(p) in self._stacked)

    def is_stacked(self, p: torch.Tensor) -> bool:
        """Whether ``p`` is a (E, fan_out, fan_in) stack of expert matrices."""
        return id(p) in self._stacked

    def matrices(self, p: torch.Tensor, u: torch.Tensor) -> list[torch.Tensor]:
        """The 2-D matrices Newton-Schulz sees in ``u`` (shaped like ``p``): one per expert of a
        stack, else the (out, in * kernel) view."""
        return list(u.unbind(0)) if self.is_stacked(p) else [as_matrix(u)]

    def initial_state(self, group: dict, p: torch.Tensor) -> dict[str, Any]:
        """State a step creates for ``p`` (built up front for sharded parameters)."""
        if group["use_muon"]:
            return {"momentum_buffer": torch.zeros_like(p)}
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": 0}

    def direction_dtype(self, group: dict) -> torch.dtype:
        """dtype of :meth:`directions`' results for ``group`` (what the sharded step sends)."""
        return NS_DTYPES[group["ns_dtype"]]

    # -- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        matrix_groups = [g for g in self.param_groups if g["use_muon"]]
        if matrix_groups:
            self._matrix_step(matrix_groups)
        for g in self.param_groups:
            if not g["use_muon"]:
                self._adam_step(g)
        return loss

    def _matrix_step(self, groups: list[dict]) -> None:
        entries = []  # (group, param, nesterov momentum)
        for g in groups:
            ps = [p for p in g["params"] if p.grad is not None]
            if not ps:
                continue
            grads = [sharded.local(p.grad) for p in ps]
            bufs = []
            for p in ps:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(sharded.local(st["momentum_buffer"]))
            beta = g["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - beta)
            # Out of place: p.grad stays the gradient (monitors, DDP hooks read it).
            upd = torch._foreach_lerp(grads, bufs, beta) if g["nesterov"] else bufs
            entries += [(g, p, u) for p, u in zip(ps, upd)]
        if not entries:
            return
        dirs = sharded.directions(self, entries) if self._sharded else self.directions(entries)
        for (g, p, _), d in zip(entries, dirs):
            self.apply_update(g, p, d.view_as(p))

    def directions(self, entries: list[tuple[dict, torch.Tensor, torch.Tensor]]
                   ) -> list[torch.Tensor]:
        """Orthogonalized momentum of each matrix (all groups batched together)."""
        # .get: groups from checkpoints written before these options
        kinds = {(g["ns_steps"], g["ns_dtype"], g.get("ns_matmul", "auto"),
                  g.get("ns_coefficients", "quintic")) for g, _, _ in entries}
        split = False if self._sharded else None  # sharded: this rank owns these matrices
        mats = [self.matrices(p, u) for _, p, u in entries]
        if len(kinds) == 1:
            steps, dtype, matmul, coefficients = kinds.pop()
            flat = orthogonalize_many([m for ms in mats for m in ms], steps, split,
                                      dtype=NS_DTYPES[dtype], matmul=matmul,
                                      coefficients=coefficients)
        else:
            flat = [o for (g, _, _), ms in zip(entries, mats)
                    for o in orthogonalize_many(ms, g["ns_steps"], split,
                                                dtype=NS_DTYPES[g["ns_dtype"]],
                                                matmul=g.get("ns_matmul", "auto"),
                                                coefficients=g.get("ns_coefficients", "quintic"))]
        out, i = [], 0
        for (_, p, _), ms in zip(entries, mats):  # experts of a stack back into one tensor
            out.append(torch.stack(flat[i:i + len(ms)]) if self.is_stacked(p) else flat[i])
            i += len(ms)
        return out

    def apply_update(self, group: dict, p: torch.Tensor, d: torch.Tensor) -> None:
        lr, mode = group["lr"], group["adjust_lr"]
        ratio = adjusted_ratio(p.shape, mode, id(p) in self._transposed, self.is_stacked(p))
        self.decay(group, p, d)
        if mode == "original" and group.get("ns_matmul") != "addmm":
            # Same bf16 scaling then fp32 add as muon.muon_update, so results match it
            # (a ratio of 1 changes no bit: skipped).
            if ratio != 1:
                d.mul_(ratio)
            p.add_(d, alpha=-lr)
        else:  # torch.optim.Muon folds the ratio into the step size
            p.add_(d, alpha=-lr * ratio)

    def decay(self, group: dict, p: torch.Tensor, d: torch.Tensor) -> None:
        """Decoupled decay of ``p`` before the update ``-lr * scale * d``; cautious (only where
        ``d`` and ``p`` share a sign) when the group says so."""
        decay_(p, d, group["lr"], group["weight_decay"], group.get("cautious_wd", False))

    def _adam_step(self, g: dict) -> None:
        ps = [p for p in g["params"] if p.grad is not None]
        if not ps:
            return
        for p in ps:
            st = self.state[p]
            if "exp_avg" not in st:
                st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), step=0)
            st["step"] += 1
        sts = [self.state[p] for p in ps]
        adam_step([sharded.local(p) for p in ps], [sharded.local(p.grad) for p in ps],
                  [sharded.local(st["exp_avg"]) for st in sts],
                  [sharded.local(st["exp_avg_sq"]) for st in sts], [st["step"] for st in sts],
                  lr=g["lr"], betas=g["betas"], eps=g["eps"], weight_decay=g["weight_decay"],
                  cautious_wd=g.get("cautious_wd", False))

register("muon", Muon, lr=0.02,
         description="Muon (Jordan et al.): Newton-Schulz-orthogonalized momentum on hidden matrices, "
                     "AdamW (adam_lr, None = 3e-4) on the rest")
