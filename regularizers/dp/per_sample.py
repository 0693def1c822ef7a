"""Per-example gradient norms and clipped sums from one ordinary backward pass.

DP-SGD (Abadi et al. 2016, Alg. 1) needs, for every example i, its gradient g_i, the
clip factor c_i = min(1, C / ||g_i||) and the sum  sum_i c_i g_i.  Forward hooks keep each
parameter-holding module's inputs a and a tensor hook keeps the gradient of its output
G = dL/d(out); from (a, G) the module's sampler (:mod:`.samplers`) gives every
per-example quantity (:mod:`.pieces`) without a second backward.

Every module that owns parameters is hooked, frozen ones too, and the trainable set is
read at each step: a layer unfrozen mid-run (``BackboneFinetuning``) is privatized from
its first trainable step on.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PrivacyError
from .pieces import LinearLike, Piece, Scaled, combine
from .samplers import Sampler, _embedding, _linear, is_conv1d, refusal, sampler_for


class _NoWeightGrad(torch.autograd.Function):
    """A Linear's output whose backward computes dX = G W only: autograd's own dW = G^T A
    (a third of the layer's backward) would be overwritten by the private sum anyway."""

    @staticmethod
    def forward(ctx, x, weight, out, transposed: bool):
        ctx.save_for_backward(weight)
        ctx.transposed, ctx.x_dtype = transposed, x.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        w = ctx.saved_tensors[0].to(g.dtype)  # under autocast the forward ran in g's dtype
        gx = g @ w.T if ctx.transposed else g @ w
        return gx.to(ctx.x_dtype), None, None, None


@dataclass
class _Call:
    acts: tuple | None
    rows: int | None = None          # the output gradient's first dimension, once it came
    pieces: dict | None = None       # computed in the backward hook
    error: Exception | None = None


def _owned(m: nn.Module) -> list[nn.Parameter]:
    """Parameters ``m`` holds itself, not aliases of its submodules' (Opacus's DPLSTM)."""
    below = {id(p) for c in m.children() for p in c.parameters()}
    return [p for p in m.parameters(recurse=False) if id(p) not in below]


class PerSampleGradients:
    """Hooks on every module that owns parameters; after one backward of a loss over a
    batch, :meth:`pieces` gives each trainable parameter's per-example gradients.

    ``loss_reduction="mean"`` (the usual ``F.cross_entropy``) scales the output gradient
    by the batch size so that piece i is the gradient of example i's own loss. Example
    independence is verified by the fit-start probe (:mod:`.probe`).
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: choose 'mean' or 'sum'")
        self.model, self.reduction = model, loss_reduction
        self._owned: dict[nn.Module, list[nn.Parameter]] = {}
        self._names: dict[nn.Module, str] = {}
        self._calls: dict[nn.Module, list[_Call]] = {}
        self._samplers: dict[nn.Module, Sampler] = {}
        self._handles = []
        self.how: dict[str, str] = {}
        self.capturing = False
        self.batch_size: int | None = None  # the step's batch size, when known
        # a backward inside the training step (adversarial training's autograd.grad) fires
        # the hooks too: the pieces are then not the step's, so the step is computed alone
        self.in_step = False
        self.inner_backward = False
        # one process only: DDP's reducer expects every weight to receive a gradient
        self.skip_weight_grads = False
        for name, m in model.named_modules():
            own = _owned(m)
            if not own:
                continue
            how, fn = sampler_for(m)
            self._owned[m], self._names[m], self._calls[m] = own, name or type(m).__name__, []
            self.how[self._names[m]] = how
            self._handles.append(m.register_forward_hook(self._forward_hook(fn)))
        # modules owning a parameter another module also owns (tied weights): their pieces
        # keep A and G, since the cross terms with the other use need them
        count: dict[int, int] = {}
        for own in self._owned.values():
            for p in own:
                count[id(p)] = count.get(id(p), 0) + 1
        self._shared = {m for m, own in self._owned.items() if any(count[id(p)] > 1 for p in own)}

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters trainable now, each once (tied ones are owned by one module)."""
        seen, out = set(), []
        for own in self._owned.values():
            for p in own:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def check(self) -> None:
        """Refuse, naming each, the trainable modules no sampler makes exact and private."""
        bad = [f"{self._names[m]}: {why}" for m, own in self._owned.items()
               if any(p.requires_grad for p in own) and (why := refusal(m))]
        if bad:
            raise PrivacyError("DP-SGD cannot train this model privately:\n  - " + "\n  - ".join(bad))

    def _forward_hook(self, fn: Sampler):
        def hook(module, inputs, output):
            if not self.capturing or not torch.is_grad_enabled():
                return
            if module not in self._owned or not any(p.requires_grad for p in self._owned[module]):
                return
            if not isinstance(output, torch.Tensor):
                raise PrivacyError(f"{type(module).__name__} returns {type(output).__name__}; "
                                   "per-example gradients need modules with parameters to "
                                   "return one tensor (wrap the parameters in a leaf module)")
            if not output.requires_grad:
                return
            B = self.batch_size
            if (fn is _embedding and B is not None and B != 1 and inputs[0].shape[0] == 1
                    and output.shape[0] == 1):
                # a position table indexed by a (1, T) index broadcast over the batch (HF
                # GPT-2): expanding the output gives the add its per-example gradients
                inputs = (inputs[0].expand(B, *inputs[0].shape[1:]),) + tuple(inputs[1:])
                output = output.expand(B, *output.shape[1:])
            if self.skip_weight_grads and fn is _linear and module.weight.requires_grad \
                    and isinstance(inputs[0], torch.Tensor):
                output = _NoWeightGrad.apply(inputs[0], module.weight, output.detach(),
                                             is_conv1d(module))
            call = _Call(tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs))
            self._calls[module].append(call)
            self._samplers[module] = fn

            def grad_hook(g):
                if self.in_step:  # the step's own backward (it is then computed alone)
                    self.inner_backward = True
                    return
                if call.acts is None and call.pieces is not None:  # a second backward
                    return
                # Per-example pieces are made as the backward reaches each layer, so a
                # layer's output gradient is freed at once and a materialized weight
                # gradient replaces its activations (peak memory as Opacus's hooks).
                g = g.detach()
                call.rows = g.shape[0]
                if call.rows == 0:
                    call.pieces, call.acts = {}, None
                    return
                was, self.capturing = self.capturing, False  # a sampler's own forwards
                try:
                    call.pieces = fn(module, call.acts, g)
                except (NotImplementedError, RuntimeError, ValueError) as e:
                    call.error = e
                    return
                finally:
                    self.capturing = was
                if module not in self._shared:
                    for piece in call.pieces.values():
                        if isinstance(piece, LinearLike):
                            piece.settle()
                call.acts = None
            output.register_hook(grad_hook)
            return output
        return hook

    @contextlib.contextmanager
    def capture(self, batch_size: int | None = None):
        """Record the forward/backward inside the block (clears earlier records).
        ``batch_size`` lets a (1, T)-indexed position table be expanded to the batch."""
        self.clear()
        self.capturing, self.batch_size = True, batch_size
        try:
            yield self
        finally:
            self.capturing = False

    def clear(self) -> None:
        for calls in self._calls.values():
            calls.clear()

    def captured(self) -> bool:
        return any(self._calls.values())

    def pieces(self) -> dict[nn.Parameter, Piece]:
        per_param: dict[nn.Parameter, list[Piece]] = {}
        sizes: dict[int, list[str]] = {}
        for m, calls in self._calls.items():
            for call in calls:
                if call.error is not None:
                    raise PrivacyError(f"no per-example gradients for {self._names[m]} "
                                       f"({type(m).__name__}): {call.error}") from call.error
                if call.rows is None:  # output unused by the loss
                    continue
                sizes.setdefault(call.rows, []).append(self._names[m])
                for p, piece in (call.pieces or {}).items():
                    per_param.setdefault(p, []).append(piece)
        if len(sizes) > 1:
            B = max(sizes, key=lambda b: len(sizes[b]))
            odd = sorted(n for b, names in sizes.items() if b != B for n in names)
            raise PrivacyError(f"modules {odd} were called on inputs whose first dimension is not "
                               f"the batch ({B} examples): per-example gradients need every "
                               "parameterized module to see a batch-first input (index a position "
                               "embedding with a (B, T) tensor, not arange(T))")
        pieces = {p: combine(v) for p, v in per_param.items()}
        if self.reduction == "mean" and sizes:  # G was of the batch mean: example i's is B G_i
            B = next(iter(sizes))
            pieces = {p: Scaled(v, float(B)) for p, v in pieces.items()}
        return pieces

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
