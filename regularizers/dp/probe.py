"""The fit-start probe: verify, on the model and data as given, what DP-SGD's analysis
assumes, instead of trusting a list of layer types.

The Gaussian mechanism's sensitivity is C only if the vector clipped for example i is a
function of example i alone, and nothing but the noisy sum leaves the step. On k training
examples (k + 1 read, so one can be swapped) the probe checks, before any step:

1. the collate function gives one row per example and no row depends on another example;
2. every parameter-holding module sees the batch in dim 0;
3. a training forward writes no parameter and updates no buffer from the data (buffers
   are saved in checkpoints without noise): buffers after a forward on D and on D' (one
   example swapped) must agree, and are restored either way;
4. swapping example j changes no other example's per-example gradient (train mode, same
   RNG, so dropout masks agree): catches ``x - x.mean(0)``, batch statistics, losses that
   couple examples, whatever the layer types;
5. each per-example gradient equals the gradient of that example alone, computed by
   autograd on a batch of one (eval mode, where dropout cannot differ), for every
   trainable parameter; and the norm used for clipping equals the norm of the vector
   summed. This catches inexact samplers and gradients that bypass the hooks (a
   parameter used outside its module, a parameter-only loss term).

What fails is refused with the reason; nothing of the probe reaches the weights, the
optimizer or the RNG streams of training.
"""
from __future__ import annotations

from typing import Callable

import torch

from .errors import PrivacyError
from .per_sample import PerSampleGradients


def _leaves(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)


def batch_rows(batch) -> int | None:
    """The number of examples in a batch: the first dimension of its first tensor."""
    return next((t.shape[0] for t in _leaves(batch) if t.dim() > 0), None)


def _seeded(fn, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def _shapes(batch) -> list:
    return [tuple(t.shape) for t in _leaves(batch)]


def check_collate(collate: Callable, items: list, j: int, spares: list = ()) -> tuple:
    """(batch of items, batch with item j swapped for a spare); refuse extra or mixed rows.
    The spare is one that keeps the batch's shapes where one exists (a collate that pads
    to the longest example changes them, legitimately), so that rows can be compared."""
    k = len(items)
    D = _seeded(lambda: collate(items))
    rows = {tuple(t.shape[:1]) for t in _leaves(D)}
    if rows != {(k,)}:
        raise PrivacyError(f"the training collate_fn turned {k} examples into tensors with "
                           f"first dimensions {sorted(r[0] for r in rows if r)}: DP-SGD clips per "
                           "row, so each example must be exactly one row (no extra views or "
                           "crops per example)")
    options = []
    for spare in spares:
        D2 = _seeded(lambda: collate(items[:j] + [spare] + items[j + 1:]))
        options.append(D2)
        if _shapes(D2) == _shapes(D):
            break
    D2 = options[-1]
    keep = [i for i in range(k) if i != j]
    if _shapes(D2) == _shapes(D):
        for a, b in zip(_leaves(D), _leaves(D2)):
            if not torch.equal(a[keep], b[keep]):
                raise PrivacyError("the training collate_fn makes a row depend on other examples "
                                   "(swapping one example changed the others' rows): move batch "
                                   "mixing out of a DP-SGD run")
    return D, D2


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
    """Run checks 1-5 (module docstring) on the k ``items``, swapping one for the first of
    ``spares`` that keeps the batch's shapes; raise on failure.

    ``loss_of(batch)`` is the training loss of a batch, as the training step computes it.
    """
    k = len(items)
    if k < 2 or not spares:
        raise PrivacyError("DP-SGD needs at least 3 training examples")
    j = k - 1
    D, D2 = (to_device(b) for b in check_collate(collate, list(items), j, spares))
    params = engine.params
    names = {id(p): n for n, p in model.named_parameters()}
    if not params:
        raise PrivacyError("the model has no trainable parameters")
    tol = 1e-3 if all(p.dtype in (torch.float32, torch.float64) for p in params) else 3e-2
    buffers = dict(model.named_buffers())
    saved = {n: b.detach().clone() for n, b in buffers.items()}
    versions = {id(p): p._version for p in model.parameters()}

    def run(batch, train: bool):
        was = model.training
        model.train(train)
        try:
            with engine.capture(batch_size=k):
                loss = _seeded(lambda: loss_of(batch), seed=1)
                torch.autograd.grad(loss, params, allow_unused=True)
                sizes = {c.rows for calls in engine._calls.values() for c in calls
                         if c.rows is not None}
                pieces = engine.pieces()
            after = {n: b.detach().clone() for n, b in buffers.items()}
        finally:
            model.train(was)
            engine.clear()
            with torch.no_grad():
                for n, b in buffers.items():
                    b.copy_(saved[n])
        written = [n for n, p in model.named_parameters() if p._version != versions[id(p)]]
        if written:
            raise PrivacyError(f"the training forward writes the parameters {written} in place "
                               "(e.g. Embedding(max_norm=...)): a data-dependent write no "
                               "noise covers; remove it")
        if sizes != {k}:
            raise PrivacyError(f"parameterized modules saw first dimensions {sorted(sizes)} on a "
                               f"batch of {k} examples: every module must see the batch in dim 0")
        return pieces, after

    pD, aD = run(D, train=True)
    pD2, aD2 = run(D2, train=True)
    moved = [n for n in buffers if not torch.equal(aD[n], aD2[n])]
    if moved:
        raise PrivacyError(f"buffers {moved} are updated from the training batch in forward: "
                           "they are saved and released without noise (BatchNorm running "
                           "statistics, a running mean ...); remove them or stop updating them")
    for i in (i for i in range(k) if i != j):
        a, b = _per_example(pD, params, i, k), _per_example(pD2, params, i, k)
        if _dist(a, b) > tol * (_norm(a) + _norm(b)) + 1e-10:
            raise PrivacyError("example independence fails: swapping one training example "
                               f"changed example {i}'s gradient by {_dist(a, b):.3g} (norm "
                               f"{_norm(a):.3g}). Something in the training step mixes examples "
                               "(batch statistics such as x - x.mean(0) or F.batch_norm, a loss "
                               "coupling examples, mixup); DP-SGD's clipping cannot bound one "
                               "example's influence then")

    pE, _ = run(D, train=False)
    norm2 = torch.sqrt(sum(pE[p].norm2() for p in params if p in pE))
    was = model.training
    model.eval()
    try:
        for i in range(k):
            one = to_device(_seeded(lambda: collate([items[i]])))
            loss = _seeded(lambda: loss_of(one), seed=1)
            ref = [g if g is not None else torch.zeros_like(p) for g, p in
                   zip(torch.autograd.grad(loss, params, allow_unused=True), params)]
            got = _per_example(pE, params, i, k)
            errs = [(_dist([g], [r]), names.get(id(p), "?")) for g, r, p in zip(got, ref, params)]
            if _dist(got, ref) > tol * _norm(ref) + 1e-8:
                worst = max(errs)[1]
                raise PrivacyError(
                    f"per-example gradients are not exact on this model: example {i}'s differs "
                    f"from its own gradient by {_dist(got, ref) / max(_norm(ref), 1e-12):.2%} "
                    f"(worst: {worst}). Either a layer has no exact per-example rule, a "
                    "parameter is used outside the module that owns it, the loss has a term "
                    "that does not pass through per-example hooks (add parameter penalties as "
                    "weight decay), or DPSGD(loss_reduction=...) does not match the loss")
            if abs(_norm(got) - float(norm2[i])) > tol * _norm(got) + 1e-8:
                raise PrivacyError(f"the clipping norm of example {i} ({float(norm2[i]):.6g}) "
                                   f"differs from the norm of its summed gradient "
                                   f"({_norm(got):.6g}): a per-example rule is inconsistent")
    finally:
        model.train(was)


def probe_module(module, engine: PerSampleGradients, dataset, collate: Callable, n: int,
                 to_device: Callable) -> None:
    """:func:`probe` on a LightningModule's ``training_step`` with its first ``n`` training
    examples and up to 7 spares; ``self.log`` is muted so the probe logs nothing."""
    items = [dataset[i] for i in range(min(len(dataset), n + 8))]

    def loss_of(batch):
        out = module.training_step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        if not isinstance(loss, torch.Tensor):
            raise PrivacyError("training_step returned no loss on the probe batch")
        return loss
    saved = {k: vars(module)[k] for k in ("log", "log_dict") if k in vars(module)}
    module.log = module.log_dict = lambda *a, **k: None
    try:
        probe(module, engine, loss_of, collate, items[:min(n, len(items) - 1)], to_device,
              spares=items[min(n, len(items) - 1):])
    finally:
        del module.log, module.log_dict
        for k, v in saved.items():
            setattr(module, k, v)
