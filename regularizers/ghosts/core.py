"""The softmax convergence radius of a proposed update (pure torch, no Lightning).

P. Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in Cross-Entropy"
(arXiv 2603.13552; reference code piyush314/ghosts-of-softmax), the linearized-logit radius.
Along a step theta + t u (|u| = 1) with the logits linearized, z_k(t) = z_k + a_k t, the
cross-entropy log sum_k exp(z_k + a_k t) - z_y - a_y t is analytic except where the partition
function sum_k w_k exp(a_k t) vanishes. For |Im t| < pi / (max_k a_k - min_k a_k) every term's
phase a_k Im t lies in an arc shorter than pi, so the terms lie in an open half-plane and the
sum cannot vanish: no complex singularity (a "ghost") is closer than

    rho_a = pi / Delta_a,   Delta_a = max_x (max_k a_k(x; u) - min_k a_k(x; u)),

where a(x; u) = J_z(x) u is the directional derivative of example x's logits (one forward-mode
JVP for the whole batch), and the max over x makes rho_a the radius of the batch loss (the
paper's rho_a, its FAQ "How do I compute rho_a"; the radius of one example's series is
>= pi / Delta_a(x), with equality for two tied classes). The Taylor model of the loss is
trustworthy only for steps tau = |delta| < rho_a; the normalized step is r = tau / rho_a.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from .jvp_rules import lean_jvp_rules


@dataclass(frozen=True)
class Radius:
    """rho_a = pi / Delta_a for a step of length tau; r = tau / rho_a (r > 1: outside)."""
    rho: float
    tau: float
    spread: float  # Delta_a, the largest per-example spread of the directional derivatives

    @property
    def r(self) -> float:
        return self.tau / self.rho if math.isfinite(self.rho) else 0.0


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: a tensor, the first entry of a tuple/list, or the
    ``logits`` of a dict / Hugging Face ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}: "
                    "return a tensor, a tuple whose first entry is the logits, or an object with "
                    "`.logits`")


def _walk(model: nn.Module) -> tuple[dict, dict, list[nn.Module]]:
    """One pass over the module tree: the parameters under the names ``named_parameters()``
    gives them, every (module, attribute) slot holding each (a tied weight has several, and
    all must carry the same dual tensor), and the distinct modules."""
    named: dict[str, nn.Parameter] = {}
    slots: dict[str, list[tuple[nn.Module, str]]] = {}
    first: dict[int, str] = {}
    modules = []
    for prefix, m in model.named_modules():  # a module registered twice comes once
        modules.append(m)
        for attr, p in m._parameters.items():
            if p is not None:
                name = first.setdefault(id(p), f"{prefix}.{attr}" if prefix else attr)
                named.setdefault(name, p)
                slots.setdefault(name, []).append((m, attr))
    return named, slots, modules


@contextmanager
def _eval_mode(model: nn.Module, modules: list[nn.Module], on: bool) -> Iterator[None]:
    """Eval mode inside (dropout off, BatchNorm on running statistics, no buffer updates),
    each submodule's own flag restored after."""
    if not on:
        yield
        return
    flags = [m.training for m in modules]
    model.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


@contextmanager
def _scratch_buffers(model: nn.Module, on: bool) -> Iterator[None]:
    """Inside, every buffer is a copy, so a train-mode forward (BatchNorm's running statistics,
    its batch counter) leaves the model's own buffers untouched."""
    if not on:
        yield
        return
    saved = [(m, k, b) for m in model.modules() for k, b in m._buffers.items() if b is not None]
    for m, k, b in saved:
        m._buffers[k] = b.clone()
    try:
        yield
    finally:
        for m, k, b in saved:
            m._buffers[k] = b


def _jvp_forward_ad(model, args, point: dict, tangents: dict, slots: dict
                    ) -> tuple[torch.Tensor, Any]:
    """One forward with dual tensors (primal ``point``, tangent ``tangents``) put in place of
    the module's parameters (``torch.autograd.forward_ad``): no functional_call, no autograd
    graph, leaner rules for linear, convolution and group norm (jvp_rules.py); the parameters
    themselves are put back untouched."""
    swapped = []
    with torch.no_grad(), fwAD.dual_level(), lean_jvp_rules():
        try:
            for name, primal in point.items():
                value = fwAD.make_dual(primal, tangents[name]) if name in tangents else primal
                for m, attr in slots.get(name, ()):
                    swapped.append((m, attr, m._parameters[attr]))
                    m._parameters[attr] = value
            z, a = fwAD.unpack_dual(logits_of(model(*args)))
        finally:
            for m, attr, p in reversed(swapped):
                m._parameters[attr] = p
    return z, a


def _jvp_func(model, args, point: dict, tangents: dict, slots: dict) -> tuple[torch.Tensor, Any]:
    """The same JVP by ``torch.func.jvp`` over ``functional_call`` (tied weights follow the
    name given, as ``functional_call(tie_weights=True)`` does)."""
    fixed = {n: p for n, p in point.items() if n not in tangents}
    fixed.update(dict(model.named_buffers()))
    moving = {n: point[n] for n in tangents}

    def f(moving_params):
        return logits_of(functional_call(model, {**fixed, **moving_params}, args))

    return jvp(f, (moving,), (tangents,))


_JVPS = {"forward_ad": _jvp_forward_ad, "func": _jvp_func}
_NO_FORWARD_AD = ("forward ad", "forward-mode", "forward mode")


def directional_logits(model: nn.Module, inputs: Any, direction: Mapping[str, torch.Tensor],
                       params: Mapping[str, torch.Tensor] | None = None, eval_mode: bool = True,
                       method: str = "forward_ad") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z and their directional derivative a = J_z u along ``direction`` (named like
    ``model.named_parameters()``; parameters it leaves out stay fixed), at ``params`` (default:
    the model's current values), by one forward-mode JVP: ``method="forward_ad"`` (dual
    tensors in place of the parameters, one plain forward) or ``"func"`` (``torch.func.jvp``
    over ``functional_call``); both give the same numbers. Buffers are left unchanged
    (``eval_mode=False`` runs on copies of them). Only ``"forward_ad"`` runs train-mode
    BatchNorm (torch.func refuses its in-place statistics update) and modules registered twice
    (functional_call leaves such a module holding its swapped-in tensors).

    Returns ``(z, a)`` of the model's logit shape (..., classes).
    """
    if method not in _JVPS:
        raise ValueError(f"method={method!r}: use one of {sorted(_JVPS)}")
    named, slots, modules = _walk(model)
    unknown = sorted(set(direction) - set(named))
    if unknown:
        raise KeyError(f"direction names {unknown[:5]} are not parameters of "
                       f"{type(model).__name__}; name tangents as model.named_parameters() does")
    bad = [(n, tuple(t.shape), tuple(named[n].shape)) for n, t in direction.items()
           if t.shape != named[n].shape]
    if bad:
        raise ValueError(f"direction shapes differ from the parameters' (name, given, wanted): "
                         f"{bad[:3]}; give one step per parameter, shaped like it")
    point = {n: (params[n] if params is not None and n in params else p).detach()
             for n, p in named.items()}
    tangents = {n: t.detach() if t.dtype == point[n].dtype else t.detach().to(point[n].dtype)
                for n, t in direction.items()}
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    # the math attention kernel: the fused CPU/GPU kernels have no forward-mode derivative
    with _eval_mode(model, modules, eval_mode), _scratch_buffers(model, not eval_mode), \
            sdpa_kernel(SDPBackend.MATH):
        try:
            z, a = _JVPS[method](model, args, point, tangents, slots)
        except (RuntimeError, NotImplementedError) as e:
            if not any(k in str(e).lower() for k in _NO_FORWARD_AD):
                raise
            raise RuntimeError(
                f"the forward of {type(model).__name__} is not forward-mode differentiable, and "
                f"rho_a needs one forward-mode JVP ({type(e).__name__}: {str(e).splitlines()[0]}). "
                "Give custom autograd.Functions a `jvp` staticmethod (and `setup_context` for "
                "method='func'), or replace the op that has no forward-AD formula") from e
    if a is None:
        raise RuntimeError(
            f"the logits of {type(model).__name__} carry no directional derivative: its forward "
            "does not read the parameters from their modules (a cached copy, `.data`, or "
            "tensors outside named_parameters()); read them as module attributes")
    return z, a


def logit_spread(a: torch.Tensor) -> torch.Tensor:
    """Per-example spread max_k a_k - min_k a_k of directional logit derivatives (..., K):
    one value per row (for a sequence model, per position)."""
    if a.ndim < 1 or a.shape[-1] < 2:
        raise ValueError(f"logit derivatives of shape {tuple(a.shape)}: need a class dim >= 2 last")
    lo, hi = torch.aminmax(a.reshape(-1, a.shape[-1]), dim=-1)  # one pass over the classes
    return hi - lo


def radius_from_spread(spread: float) -> float:
    """rho_a = pi / Delta_a (inf for Delta_a = 0: the step moves no logit apart)."""
    return math.pi / spread if spread > 0 else math.inf


def softmax_radius(model: nn.Module, inputs: Any, delta: Mapping[str, torch.Tensor],
                   params: Mapping[str, torch.Tensor] | None = None, eval_mode: bool = True,
                   method: str = "forward_ad") -> Radius:
    """rho_a, tau = |delta| and r = tau / rho_a for the update ``delta`` (a dict of parameter
    steps named as in ``model.named_parameters()``) proposed at ``params`` (default: the
    model's current weights) on the batch ``inputs``."""
    if not delta:
        raise ValueError("delta is empty: pass {name: step} for the parameters the update moves")
    steps = list(delta.values())
    tau = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(steps)).double()))
    if not math.isfinite(tau):
        raise ValueError(f"the proposed step has non-finite length {tau}")
    if tau == 0.0:
        return Radius(math.inf, 0.0, 0.0)
    # a is linear in the tangent: J_z (delta / tau) = (J_z delta) / tau, so JVP along delta itself
    _, a = directional_logits(model, inputs, delta, params, eval_mode, method)
    spread = float(logit_spread(a).max()) / tau
    return Radius(radius_from_spread(spread), tau, spread)
