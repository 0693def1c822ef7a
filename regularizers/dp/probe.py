"""The exactness probe: the hooks' per-example gradients against each example's own.

Whether a step keeps examples apart is checked on every step as it runs (:mod:`.step`,
:mod:`.rows`); what remains for a probe is exactness, which is a question of the model,
not of the data: on k training examples (eval mode, so dropout cannot differ) each
example's piece must equal the gradient of that example alone, computed by autograd on a
batch of one, for every trainable parameter, and the norm used for clipping must equal the
norm of the vector summed. This catches gradients that bypass the hooks (a parameter used
outside its module, a parameter-only loss term) and inexact samplers. It runs at fit start
and again whenever the trainable set changes. A step the tracker cannot separate is
computed alone anyway, so the probe then has nothing to compare and passes.
"""
from __future__ import annotations

import contextlib

from typing import Callable

import torch

from .errors import PrivacyError
from .per_sample import PerSampleGradients
from .rows import tensors_in
from .sampling import map_tensors


def batch_rows(batch) -> int | None:
    """The number of examples in a batch: the first dimension of its first tensor."""
    return next((t.shape[0] for t in tensors_in(batch) if t.dim() > 0), None)


def rows_of(batch, i: int):
    """Row ``i`` of a collated batch, as a batch of one."""
    return map_tensors(batch, lambda t: t[i:i + 1] if t.dim() else t)


def same_batch(a, b) -> bool:
    """Two batches with equal tensors (shapes, dtypes, values)."""
    la, lb = list(tensors_in(a)), list(tensors_in(b))
    return len(la) == len(lb) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y.to(x.device))
        for x, y in zip(la, lb))


def _seeded(fn, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _shapes(batch) -> list:
    return [tuple(t.shape) for t in tensors_in(batch)]


def _per_example(pieces: dict, params: list, i: int, B: int) -> list[torch.Tensor]:
    e = torch.zeros(B)
    e[i] = 1
    return [pieces[p].weighted_sum(e.to(p.device)) if p in pieces else torch.zeros_like(p, dtype=torch.float32)
            for p in params]


def _dist(a: list, b: list) -> float:
    return float(torch.sqrt(sum((x.double() - y.double()).square().sum() for x, y in zip(a, b))))


def _norm(a: list) -> float:
    return float(torch.sqrt(sum(x.double().square().sum() for x in a)))


def probe(model: torch.nn.Module, engine: PerSampleGradients, loss_of: Callable,
          collate: Callable, items: list, to_device: Callable = lambda b: b,
          spares: list = ()) -> None:
    """Check the hooks' per-example gradients on the ``items`` (module docstring); raise
    :class:`PrivacyError` naming the worst parameter on a mismatch. ``loss_of(batch)`` is
    the training loss of a batch as the training step computes it."""
    from .isolated import example_gradient
    from .rows import RowTracker
    k = len(items)
    if k < 1:
        raise PrivacyError("DP-SGD needs training examples")
    params = engine.params
    if not params:
        raise PrivacyError("the model has no trainable parameters")
    names = {id(p): n for n, p in model.named_parameters()}
    tol = 1e-3 if all(p.dtype in (torch.float32, torch.float64) for p in params) else 3e-2
    buffers = dict(model.named_buffers())
    saved = {n: b.detach().clone() for n, b in buffers.items()}
    was = model.training
    model.eval()
    try:
        batch = to_device(_seeded(lambda: collate(list(items))))
        tracker = RowTracker(k)
        tracker.mark(batch)
        with engine.capture(batch_size=k):
            engine.in_step, engine.inner_backward = True, False
            try:
                with tracker:
                    loss = _seeded(lambda: loss_of(batch), seed=1)
            finally:
                engine.in_step = False
            verdict = tracker.verdict(loss)
            if not verdict.separable or engine.inner_backward or \
                    not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                return  # computed alone at every step: nothing to compare
            handles = verdict.install()
            try:
                torch.autograd.grad(loss, params, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            pieces = engine.pieces()
        engine.clear()
        norm2 = torch.sqrt(sum(pieces[p].norm2() for p in params if p in pieces))
        singles = [to_device(_seeded(lambda it=it: collate([it]))) for it in items]
        if not all(same_batch(rows_of(batch, i), one) for i, one in enumerate(singles)):
            return  # rows are not the examples alone (padding): such steps run isolated
        for i, one in enumerate(singles):
            if not torch.isfinite(norm2[i]):
                continue  # contributes zero at every step, whatever its pieces
            ref = example_gradient(lambda b: _seeded(lambda: loss_of(b), seed=1), one, params)
            got = _per_example(pieces, params, i, k)
            if _dist(got, ref) > tol * _norm(ref) + 1e-8:
                worst = max((_dist([g], [r]), names.get(id(p), "?"))
                            for g, r, p in zip(got, ref, params))[1]
                raise PrivacyError(
                    f"per-example gradients are not exact on this model: example {i}'s differs "
                    f"from its own gradient by {_dist(got, ref) / max(_norm(ref), 1e-12):.2%} "
                    f"(worst: {worst}). Either a layer has no exact per-example rule, a "
                    "parameter is used outside the module that owns it, or the loss has a "
                    "term that does not pass through per-example hooks (add parameter "
                    "penalties as weight decay)")
            if abs(_norm(got) - float(norm2[i])) > tol * _norm(got) + 1e-8:
                raise PrivacyError(f"the clipping norm of example {i} ({float(norm2[i]):.6g}) "
                                   f"differs from the norm of its summed gradient "
                                   f"({_norm(got):.6g}): a per-example rule is inconsistent")
    finally:
        engine.clear()
        model.train(was)
        with torch.no_grad():
            for n, b in buffers.items():
                b.copy_(saved[n])


@contextlib.contextmanager
def muted_logging(module):
    """``self.log`` / ``self.log_dict`` do nothing inside the block (runs of the training step
    that are not the step: the probe, the examples computed alone), then are as they were."""
    saved = {k: vars(module)[k] for k in ("log", "log_dict") if k in vars(module)}
    module.log = module.log_dict = lambda *a, **k: None
    try:
        yield
    finally:
        del module.log, module.log_dict
        for k, v in saved.items():
            setattr(module, k, v)


def probe_module(module, engine: PerSampleGradients, dataset, collate: Callable, n: int,
                 to_device: Callable, step: Callable | None = None) -> None:
    """:func:`probe` on a LightningModule's ``training_step`` (or ``step``) with its first
    ``n`` training examples; ``self.log`` is muted so the probe logs nothing."""
    items = [dataset[i] for i in range(min(len(dataset), n))]
    step = step or module.training_step

    def loss_of(batch):
        out = step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise PrivacyError("training_step returned no loss on the probe batch")
        return loss
    with muted_logging(module):
        probe(module, engine, loss_of, collate, items, to_device)
