"""Row tracking: does this training step keep examples apart, on the step that runs?

DP-SGD's sensitivity is C only if the vector clipped for example i is a function of
example i alone (Abadi et al. 2016, Sec. 3.1; the add/remove neighbouring relation of
Mironov et al. 2019). A fit-start probe sees one draw of one branch on a few items, so a
branch taken later (mixup with probability p, a warm-up switch), a coupling hidden in the
first items (a class-weighted mean on class-sorted data) or a batch-level data-dependent
Python branch passes it. :class:`RowTracker` instead watches every ATen operation of the
step that actually runs (a ``TorchDispatchMode``) and marks each tensor that depends on
the batch with where its examples live: ``Rows(axis, block)`` says that along ``axis``
example k owns entries ``[k*block, (k+1)*block)`` and nothing else. An operation keeps
that structure only under an explicit rule below; any other operation on a tracked
tensor, a reduction or an index across the batch axis, an in-place write into a view, or
a tracked value read on the host (``.item()``, ``if``) makes the step *coupled*, and the
callback then computes that step's per-example gradients in isolation
(:mod:`.isolated`). Unknown operations therefore cost speed, never privacy.

The loss must be one batch reduction (``sum``/``mean``, or ``nll_loss``/a pointwise loss
with reduction ``mean``/``sum``) of a row-tracked tensor P, followed only by affine maps
with public coefficients. The callback then replaces P's incoming gradient by the
canonical one (:meth:`Verdict.canonical_grad`): example i's loss is the mean (or sum) of its
own entries of P, whatever scale the batch gave the loss (a 1/B rounded in bf16, a user's
``sum() / len(batch)``, class weights normalized over the batch, padding tokens counted
over the batch). So the per-example gradients the hooks read are those of a per-example
sum in any precision (issue 23, items 3 and 5).

A data-dependent write into a tensor that outlives the step (a parameter, a buffer, a
module attribute) is refused: it would be released without noise.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from .errors import PrivacyError

aten = torch.ops.aten


@dataclass(frozen=True)
class Rows:
    axis: int
    block: int


class _Agg:  # depends on several examples at once
    def __repr__(self):
        return "coupled"


AGG = _Agg()


@dataclass(frozen=True)
class Loss:
    """A batch reduction of row tensor ``P`` and affine maps of it with public numbers."""
    red: "Reduction"


@dataclass(eq=False)
class Reduction:
    kind: str                       # "mean", "sum", "nll", "rescale"
    P: torch.Tensor                 # the reduced row tensor (its gradient gets replaced)
    rows: Rows
    batch: int
    args: dict = field(default_factory=dict)
    out: weakref.ref | None = None  # the reduction's output (its gradient is the loss scale)


_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SAME = {aten.clone.default, aten.detach.default, aten.alias.default, aten._to_copy.default,
         aten.lift_fresh.default, aten.contiguous.default, aten.native_dropout.default,
         aten._conj.default, aten.positive.default}
_CREATE_LIKE = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                aten.full_like.default, aten.rand_like.default, aten.randn_like.default,
                aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
                aten.new_full.default, aten.new_empty_strided.default, aten.bernoulli.p,
                aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
_ESCAPE = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default,
           aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
           aten.unique_consecutive.default, aten.unique_dim.default, aten.equal.default,
           aten.allclose.default}
_SUM_MEAN = {aten.sum.default: "sum", aten.mean.default: "mean", aten.sum.dim_IntList: "sum",
             aten.mean.dim: "mean"}
_DIM_REDUCE = {aten.amax.default, aten.amin.default, aten.logsumexp.default,
               aten.linalg_vector_norm.default, aten.var.correction, aten.std.correction,
               aten.var_mean.correction, aten.std_mean.correction, aten.any.dim, aten.all.dim,
               aten.prod.dim_int, aten.max.dim, aten.min.dim, aten.argmax.default,
               aten.argmin.default, aten.sum.dim_IntList, aten.mean.dim}
_ALONG_DIM = {aten._softmax.default, aten._log_softmax.default, aten.cumsum.default,
              aten.sort.default, aten.topk.default, aten.cumprod.default, aten.argsort.default,
              aten.sort.stable, aten.logcumsumexp.default, aten._safe_softmax.default}
_POINTWISE_LOSSES = {aten.mse_loss.default, aten.l1_loss.default, aten.smooth_l1_loss.default,
                     aten.huber_loss.default, aten.binary_cross_entropy.default,
                     aten.binary_cross_entropy_with_logits.default, aten.soft_margin_loss.default}
_ATTENTION = {getattr(aten, n).default for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math", "_scaled_dot_product_fused_attention_overrideable",
    "scaled_dot_product_attention") if hasattr(aten, n)}
_NORMS = {aten.native_layer_norm.default}
# operations on each (batch, channel) slice's last k dims: pooling, resampling, patches
_LAST_DIMS = {}
for _k, _names in {1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d",
                       "max_pool1d_with_indices", "upsample_nearest1d", "upsample_linear1d",
                       "_upsample_nearest_exact1d"),
                   2: ("max_pool2d_with_indices", "max_pool2d", "avg_pool2d",
                       "_adaptive_avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                       "upsample_nearest2d", "upsample_bilinear2d", "_upsample_nearest_exact2d",
                       "_upsample_bilinear2d_aa", "upsample_bicubic2d", "im2col",
                       "reflection_pad2d", "replication_pad2d"),
                   3: ("max_pool3d_with_indices", "avg_pool3d", "_adaptive_avg_pool3d",
                       "upsample_nearest3d", "upsample_trilinear3d")}.items():
    for _n in _names:
        if hasattr(aten, _n):
            _LAST_DIMS[getattr(aten, _n).default] = _k
for _n, _k in (("reflection_pad1d", 1), ("replication_pad1d", 1), ("reflection_pad3d", 3),
               ("replication_pad3d", 3)):
    if hasattr(aten, _n):
        _LAST_DIMS[getattr(aten, _n).default] = _k
if hasattr(aten, "_fused_rms_norm"):
    _NORMS.add(aten._fused_rms_norm.default)


def tensors_in(*xs) -> list[torch.Tensor]:
    """The tensors in ``xs`` and their lists, tuples and dicts, in order (a batch, or an
    operator's arguments and outputs)."""
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for v in x:
                if isinstance(v, torch.Tensor):
                    out.append(v)
                elif isinstance(v, (list, tuple, dict)):
                    out.extend(tensors_in(v))
        elif isinstance(x, dict):
            out.extend(tensors_in(*x.values()))
    return out


def _storage(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (views share it), without building a storage object."""
    try:
        return t.data_ptr() - t.storage_offset() * t.element_size()
    except RuntimeError:
        return -1


_FACTS: dict = {}


def _facts(func) -> tuple[bool, tuple[int, ...]]:
    """(mutates an argument, indices of the arguments it writes), cached per operator."""
    got = _FACTS.get(func)
    if got is None:
        targets = tuple(i for i, a in enumerate(func._schema.arguments)
                        if a.alias_info is not None and a.alias_info.is_write)
        got = _FACTS[func] = (func._schema.is_mutable, targets)
    return got


def _dims(dim, ndim: int) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(ndim, 1) for d in dims)


def _view_rows(rows: Rows, old: tuple, new: tuple, B: int) -> Rows | None:
    """Where the examples live after a reshape, or None if they no longer own contiguous
    blocks of one axis (two examples merged into one row, the batch merged with a
    leading axis)."""
    a = rows.axis
    pre, post = math.prod(old[:a]), math.prod(old[a + 1:])
    chunk = rows.block * post  # elements example k owns in the flattened tail
    for a2 in range(len(new)):
        if math.prod(new[:a2]) != pre:
            continue
        post2 = math.prod(new[a2 + 1:])
        if post2 and chunk % post2 == 0 and new[a2] == B * (chunk // post2):
            return Rows(a2, chunk // post2)
    return None


class RowTracker(TorchDispatchMode):
    """Track where the examples of a batch of ``B`` rows live through one training step.

    ``mark(batch)`` before the step; ``verdict(loss)`` after it. ``reasons`` lists what
    coupled examples (the first few), ``escaped`` whether a tracked value reached the host.
    """

    def __init__(self, batch_size: int):
        super().__init__()
        self.B = batch_size
        self.tags = WeakTensorKeyDictionary()
        self.born: set[int] = set()               # storages created during the step
        self.uses = WeakTensorKeyDictionary()     # how many operations read a tensor
        self.written_views: set[int] = set()      # storages written through a view
        self.reasons: list[str] = []
        self.escaped = False

    # ------------------------------------------------------------------ marking
    def mark(self, batch) -> None:
        for t in tensors_in(batch):
            self.tags[t] = Rows(0, 1) if t.dim() > 0 and t.shape[0] == self.B else AGG
            self.born.add(_storage(t))

    def tag(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        if self.written_views and _storage(t) in self.written_views:
            return AGG
        return self.tags.get(t)

    def _couple(self, why: str):
        if len(self.reasons) < 5:
            self.reasons.append(why)
        return AGG

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # the hot path of every DP step: one dict lookup per tensor, storages only by pointer
        kwargs = kwargs or {}
        ins = tensors_in(args, kwargs)
        tags = self.tags
        tracked = [(t, g) for t in ins if (g := self.tag(t)) is not None]
        mutable, targets = _facts(func)
        if tracked and mutable:
            self._refuse_persistent_write(func, args, targets)  # before the write happens
        out = func(*args, **kwargs)
        outs = tensors_in(out)
        old = {_storage(t) for t in ins}
        self.born.update(st for st in map(_storage, outs) if st not in old)
        if not tracked:
            return out
        if func is not aten.detach.default:  # autograd saving a tensor is no use of it
            uses = self.uses
            for t, _ in tracked:
                uses[t] = uses.get(t, 0) + 1
        if func in _ESCAPE:
            self.escaped = True
            self._couple(f"{func} reads a batch-dependent value on the host (a Python branch "
                         "or .item() on it)")
            result = AGG
        elif func in _CREATE_LIKE:
            return out  # depends on the shape only
        else:
            try:
                result = self._rule(func, args, kwargs, out, tracked)
            except (IndexError, TypeError, ValueError):
                result = None
            if result is None:
                result = self._couple(f"{func} on batch-dependent inputs has no row rule")
        if mutable:
            self._write(args, targets, result)
        per = result if isinstance(result, list) else [result] * len(outs)
        for t, r in zip(outs, per):
            if r is not None:
                tags[t] = r
            if isinstance(r, Loss) and r.red.out is None:
                r.red.out = weakref.ref(t)
        return out

    def _refuse_persistent_write(self, func, args, targets) -> None:
        for t in (args[i] for i in targets if i < len(args)):
            if isinstance(t, torch.Tensor) and _storage(t) not in self.born:
                raise PrivacyError(
                    f"the training step writes batch-dependent values into a tensor that "
                    f"outlives the step ({func}, shape {tuple(t.shape)}): a parameter, buffer "
                    "or module attribute updated from the data is saved and released without "
                    "noise (a running mean, BatchNorm statistics, a cache). Remove the write, "
                    "or compute it from public data")

    def _write(self, args, targets, result) -> None:
        for t in (args[i] for i in targets if i < len(args)):
            if not isinstance(t, torch.Tensor):
                continue
            new = result if not isinstance(result, list) else AGG
            if new is not None and new != self.tags.get(t):
                # views of this storage, made before or after, may now hold what was
                # written: every tensor on it counts as coupled from here on
                self.written_views.add(_storage(t))
            elif new is not None:
                self.tags[t] = new

    # ------------------------------------------------------------------ rules
    def _rule(self, func, args, kwargs, out, tracked):
        B = self.B
        if any(g is AGG for _, g in tracked):
            return AGG
        losses = [g for _, g in tracked if isinstance(g, Loss)]
        if losses:
            return self._loss_rule(func, args, out, tracked, losses)
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        gx = self.tag(x) if x is not None else None
        if torch.Tag.pointwise in func.tags or func in (aten.masked_fill.Scalar,
                                                        aten.masked_fill.Tensor):
            return self._pointwise(out, tracked)
        if func in _SAME:
            return gx if isinstance(gx, Rows) else None
        if func in (aten.fill_.Scalar, aten.fill_.Tensor, aten.zero_.default):
            return gx if all(t is x for t, _ in tracked) else None
        if func == aten.copy_.default:
            return self._pointwise(x, [(t, g) for t, g in tracked if t is not x])
        if func in _VIEWS:
            return _view_rows(gx, tuple(x.shape), tuple(out.shape), B) if gx else None
        if func == aten.expand.default:
            return Rows(gx.axis + out.dim() - x.dim(), gx.block) \
                if gx and out.shape[gx.axis + out.dim() - x.dim()] == x.shape[gx.axis] else None
        if func in (aten.permute.default,):
            return Rows(list(args[1]).index(gx.axis) if gx.axis in args[1]
                        else [d % x.dim() for d in args[1]].index(gx.axis), gx.block)
        if func in (aten.transpose.int, aten.t.default):
            d0, d1 = (args[1] % x.dim(), args[2] % x.dim()) if func == aten.transpose.int else (0, 1)
            ax = d1 if gx.axis == d0 else d0 if gx.axis == d1 else gx.axis
            return Rows(ax, gx.block)
        if func in (aten.unsqueeze.default,):
            d = args[1] % (x.dim() + 1)
            return Rows(gx.axis + (d <= gx.axis), gx.block)
        if func in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            return _view_rows(gx, tuple(x.shape), tuple(out.shape), B)
        if func in (aten.slice.Tensor, aten.select.int, aten.split.Tensor,
                    aten.split_with_sizes.default, aten.unbind.int, aten.narrow.default,
                    aten.chunk.default):
            d = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % x.dim()
            if d == gx.axis:
                return self._couple(f"{func} cuts along the batch axis")
            if func == aten.select.int or func == aten.unbind.int:
                ax = gx.axis - (d < gx.axis)
                return [Rows(ax, gx.block)] * len(tensors_in(out)) if func == aten.unbind.int \
                    else Rows(ax, gx.block)
            return [gx] * len(tensors_in(out)) if isinstance(out, (list, tuple)) else gx
        if func in _SUM_MEAN or func in _DIM_REDUCE:
            return self._reduce(func, args, kwargs, x, gx, out)
        if func in _ALONG_DIM:
            d = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            if func in (aten.sort.default, aten.argsort.default, aten.sort.stable) \
                    and not isinstance(d, int):
                d = kwargs.get("dim", -1)
            if func == aten.topk.default:
                d = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            if d % x.dim() == gx.axis:
                return self._couple(f"{func} works along the batch axis")
            return [gx] * len(tensors_in(out)) if isinstance(out, (list, tuple)) else gx
        if func in (aten.mm.default, aten.bmm.default, aten.addmm.default,
                    aten.baddbmm.default, aten.addbmm.default):
            return self._matmul(func, args)
        if func == aten.embedding.default:
            gw, gi = self.tag(args[0]), self.tag(args[1])
            return Rows(gi.axis, gi.block) if gw is None and isinstance(gi, Rows) else None
        if func in (aten.index.Tensor,):
            return self._index(x, gx, args[1], out)
        if func == aten.index_select.default:
            d, gi = args[1] % x.dim(), self.tag(args[2])
            if gx is not None and gi is None and d != gx.axis:
                return gx
            if gx is None and isinstance(gi, Rows):
                return Rows(d, gi.block)
            return None
        if func == aten.gather.default:
            d, gi = args[1] % x.dim(), self.tag(args[2])
            if gx is not None and d != gx.axis and (gi is None or gi == gx):
                return gx
            return None
        if func == aten.cat.default:
            ts = [t for t in args[0] if not (t.dim() == 1 and t.numel() == 0)]  # cat skips them
            d = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % ts[0].dim()
            gs = {self.tag(t) for t in ts if self.tag(t) is not None}
            if len(gs) == 1 and (g := next(iter(gs))).axis != d and all(
                    self.tag(t) is not None or t.shape[g.axis] == out.shape[g.axis] for t in ts):
                return g
            return None
        if func == aten.constant_pad_nd.default:
            return gx if gx.axis < x.dim() - len(args[1]) // 2 else None
        if func in (aten.tril.default, aten.triu.default):
            return gx if gx.axis < x.dim() - 2 else None
        if func in (aten.roll.default, aten.flip.default):
            dims = _dims(args[2] if func == aten.roll.default else args[1], x.dim())
            return gx if gx.axis not in dims else None
        if func in _LAST_DIMS:
            if gx.axis >= x.dim() - _LAST_DIMS[func] or any(
                    self.tag(t) is not None for t in tensors_in(args[1:])):
                return None
            if func == aten.im2col.default:
                return gx if gx.axis == 0 and gx.block == 1 else None
            return [gx if t.dim() == x.dim() else None for t in tensors_in(out)]
        if func == aten.unfold.default:
            return gx if args[1] % x.dim() != gx.axis else None
        if func in _NORMS:
            k = len(args[1])
            return [gx] * len(tensors_in(out)) if gx.axis < x.dim() - k and \
                all(self.tag(t) is None for t in args[2:] if isinstance(t, torch.Tensor)) else None
        if func == aten.native_group_norm.default:
            return [gx] * 3 if gx.axis == 0 and all(
                self.tag(t) is None for t in args[1:3] if isinstance(t, torch.Tensor)) else None
        if func in (aten._native_batch_norm_legit_no_training.default,):
            return [gx] * len(tensors_in(out)) if gx.axis == 0 and all(
                self.tag(t) is None for t in args[1:5] if isinstance(t, torch.Tensor)) else None
        if func == aten.convolution.default:
            return gx if gx.axis == 0 and self.tag(args[1]) is None and \
                self.tag(args[2]) is None else None
        if func in _ATTENTION:
            qkv = [self.tag(t) for t in args[:3]]
            if all(isinstance(g, Rows) and g.axis == 0 and g == qkv[0] for g in qkv):
                m = kwargs.get("attn_mask", args[3] if len(args) > 3 and func ==
                               aten._scaled_dot_product_attention_math.default else None)
                gm = self.tag(m) if isinstance(m, torch.Tensor) else None
                if gm is None or gm == qkv[0]:
                    return [qkv[0] if t.dim() and t.shape[0] == args[0].shape[0] else None
                            for t in tensors_in(out)]
            return None
        if func == aten.nll_loss_forward.default:
            return self._nll(args, out)
        if func in _POINTWISE_LOSSES:
            return self._pointwise_loss(func, args, kwargs, out, tracked)
        return None

    def _pointwise(self, out, tracked):
        outs = tensors_in(out)
        shape = outs[0].shape
        found = set()
        for t, g in tracked:
            ax = g.axis + len(shape) - t.dim()
            if t.shape[g.axis] != shape[ax]:
                return None  # broadcast along the batch axis
            found.add(Rows(ax, g.block))
        return next(iter(found)) if len(found) == 1 else None

    def _reduce(self, func, args, kwargs, x, gx, out):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if func in (aten.sum.default, aten.mean.default):
            dim = None
        if func in (aten.var.correction, aten.std.correction, aten.var_mean.correction,
                    aten.std_mean.correction) and len(args) > 1:
            dim = args[1]
        if func in (aten.linalg_vector_norm.default,):
            dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        keep = kwargs.get("keepdim", False)
        if func in (aten.amax.default, aten.amin.default, aten.logsumexp.default,
                    aten.sum.dim_IntList, aten.mean.dim, aten.any.dim, aten.all.dim,
                    aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default,
                    aten.prod.dim_int) and len(args) > 2 and isinstance(args[2], bool):
            keep = args[2]
        if func in (aten.linalg_vector_norm.default,) and len(args) > 3:
            keep = args[3]
        dims = _dims(dim, x.dim())
        if gx.axis not in dims:
            ax = gx.axis if keep else gx.axis - sum(d < gx.axis for d in dims)
            return [Rows(ax, gx.block)] * len(tensors_in(out)) if isinstance(out, (list, tuple)) \
                else Rows(ax, gx.block)
        if func in _SUM_MEAN and len(dims) == x.dim():
            return Loss(Reduction(_SUM_MEAN[func], x, gx, self.B))
        return self._couple(f"{func} reduces over the batch axis")

    def _matmul(self, func, args):
        if func in (aten.addmm.default, aten.baddbmm.default, aten.addbmm.default):
            bias, a, b = args[:3]
        else:
            bias, (a, b) = None, args[:2]
        ga, gb, gc = self.tag(a), self.tag(b), self.tag(bias) if bias is not None else None
        if func == aten.addbmm.default:
            return None
        batched = func in (aten.bmm.default, aten.baddbmm.default)
        if ga is not None and gb is None and (ga.axis == 0 or (batched and ga.axis == 1)):
            res = ga
        elif ga is None and gb is not None and not batched and gb.axis == 1:
            res = gb
        elif ga is not None and gb is not None and batched and ga == gb and ga.axis == 0:
            res = ga
        else:
            return None
        if gc is not None and gc != res:
            return None
        return res

    def _index(self, x, gx, indices, out):
        idx = list(indices)
        tagged = [(i, self.tag(t)) for i, t in enumerate(idx) if isinstance(t, torch.Tensor)]
        if gx is not None:
            if any(g is not None for _, g in tagged):
                return None
            if gx.axis < len(idx) and idx[gx.axis] is not None:
                return self._couple("indexing along the batch axis (x[perm], x[mask])")
            first = min(i for i, _ in tagged) if tagged else len(idx)
            if gx.axis < first:
                return gx
            return None
        # a public table indexed by batch-dependent indices: rows follow the index
        if len(tagged) == 1 and tagged[0][0] == 0 and isinstance(tagged[0][1], Rows):
            return tagged[0][1]
        return None

    def _nll(self, args, out):
        x, target, weight, reduction, ignore = args[:5]
        gx, gt = self.tag(x), self.tag(target)
        if self.tag(weight) is not None or x.dim() != 2 or not isinstance(gx, Rows) \
                or gx.axis != 0 or (gt is not None and gt != gx):
            return None
        if reduction == 0:
            return [gx, AGG]  # total_weight counts the batch's targets
        kind = "mean" if reduction == 1 else "sum"
        red = Reduction("nll", x, gx, self.B,
                        {"target": target, "weight": weight, "ignore": ignore, "mode": kind})
        return [Loss(red), AGG]

    def _pointwise_loss(self, func, args, kwargs, out, tracked):
        reduction = kwargs.get("reduction", args[2] if len(args) > 2 and isinstance(
            args[2], int) else 1)
        if func == aten.binary_cross_entropy_with_logits.default:
            reduction = kwargs.get("reduction", args[4] if len(args) > 4 else 1)
        if func == aten.binary_cross_entropy.default:
            reduction = kwargs.get("reduction", args[3] if len(args) > 3 else 1)
        g = self._pointwise(args[0].new_empty(torch.broadcast_shapes(
            *[t.shape for t in args[:2] if isinstance(t, torch.Tensor)])), tracked)
        if g is None:
            return None
        if reduction == 0:
            return g
        x = args[0]
        if self.tag(x) != g or x.dtype not in (torch.float32, torch.float64) or \
                tuple(x.shape) != tuple(torch.broadcast_shapes(
                    *[t.shape for t in args[:2] if isinstance(t, torch.Tensor)])):
            return None  # the rescaled gradient would carry the batch's rounding
        kind = "mean" if reduction == 1 else "sum"
        return Loss(Reduction("rescale", x, g, self.B, {"mode": kind}))

    def _loss_rule(self, func, args, out, tracked, losses):
        if len(tracked) != 1 or len({id(g.red) for g in losses}) != 1:
            return self._couple("the loss combines several batch reductions (or a batch "
                                "reduction with per-example values)")
        if func in _SAME or func in _VIEWS or func in (aten.squeeze.default, aten.squeeze.dim,
                                                       aten.unsqueeze.default,
                                                       aten.expand.default):
            return losses[0]
        if func in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
                    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
                    aten.neg.default, aten.rsub.Scalar):
            if func in (aten.div.Tensor, aten.div.Scalar) and tracked[0][0] is not args[0]:
                return self._couple("the loss divides by a batch reduction")
            return losses[0]
        return self._couple(f"{func} transforms the batch loss non-affinely")

    def check_kept(self, module) -> None:
        """Refuse batch-dependent tensors the step left on the module (``self.cache = h``):
        the next step would read them as public."""
        for name, m in module.named_modules():
            kept = [(k, v) for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
            kept += list(m._buffers.items())
            for k, v in kept:
                if v is not None and self.tag(v) is not None:
                    raise PrivacyError(
                        f"the training step keeps a batch-dependent tensor on the module "
                        f"({name + '.' if name else ''}{k}): a later step or a checkpoint "
                        "would release it without noise. Keep per-step values local")

    # ------------------------------------------------------------------ verdict
    def verdict(self, loss) -> "Verdict":
        g = self.tag(loss) if isinstance(loss, torch.Tensor) else None
        if self.escaped:
            return Verdict(None, self.reasons)
        if g is None:
            return Verdict(None, [], public=True)
        if not isinstance(g, Loss):
            return Verdict(None, self.reasons or [f"the loss is {g}, not a batch reduction"])
        P = g.red.P
        if self.uses.get(P, 0) != 1:
            return Verdict(None, self.reasons + ["the reduced tensor is also used elsewhere"])
        return Verdict(g.red, self.reasons)


@dataclass
class Verdict:
    red: Reduction | None
    reasons: list
    public: bool = False

    @property
    def separable(self) -> bool:
        return self.public or self.red is not None

    def install(self) -> list:
        """Replace the reduced tensor's incoming gradient by the canonical one
        (:func:`canonical_grad`); returns the hook handles, to remove after the backward."""
        if self.red is None:
            return []
        red, P = self.red, self.red.P
        handles, seen = [], {}
        if red.kind == "rescale":
            out = red.out() if red.out is not None else None
            if out is None:
                raise PrivacyError("the loss reduction's output is gone before the backward")

            def grab(g):
                seen["s"] = g.detach()
            handles.append(out.register_hook(grab))
        handles.append(P.register_hook(lambda g: canonical_grad(red, P, g, seen.get("s"))))
        return handles


def _example_of(rows: Rows, n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device) // rows.block


def canonical_grad(red: Reduction, P: torch.Tensor, incoming: torch.Tensor,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """dL/dP for L = sum_i l_i, where l_i is the mean (or sum) of example i's own entries
    of P: the gradient of the per-example losses, free of the batch's scale."""
    B = max(red.batch, 1)
    per = P.numel() // B
    if red.kind in ("mean", "sum"):
        return torch.full_like(incoming, 1.0 / per if red.kind == "mean" else 1.0)
    if red.kind == "rescale":  # a pointwise loss (fp32+): undo s * (1/numel or 1)
        mode = red.args["mode"]
        batch_scale = scale.double() * (1.0 / P.numel() if mode == "mean" else 1.0)
        want = 1.0 / per if mode == "mean" else 1.0
        return (incoming.double() * (want / batch_scale)).to(incoming.dtype)
    target, weight, ignore, mode = (red.args[k] for k in ("target", "weight", "ignore", "mode"))
    N, C = P.shape
    safe = target.clamp(0, C - 1)
    w = torch.ones(N, device=P.device, dtype=torch.float32) if weight is None else \
        weight.float()[safe]
    w = torch.where(target == ignore, torch.zeros_like(w), w)
    if mode == "mean":  # example i's loss: its own weighted mean over its valid targets
        ex = _example_of(red.rows, N, P.device)
        tot = torch.zeros(B, device=P.device, dtype=torch.float32).index_add_(0, ex, w)
        w = torch.where(tot[ex] > 0, w / tot[ex].clamp_min(1e-30), torch.zeros_like(w))
    g = torch.zeros(N, C, device=P.device, dtype=torch.float32)
    g.scatter_(1, safe[:, None], -w[:, None])
    return g.to(incoming.dtype)
