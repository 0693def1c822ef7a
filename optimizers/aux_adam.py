"""The AdamW step of the matrix optimizers' ``use_muon=False`` groups.

The op sequence is ``muon.adam_update`` followed by the decoupled decay and the add of
``muon.SingleDeviceMuonWithAuxAdam.step`` (Jordan et al. 2024, the reference package), so
results equal that reference bitwise:

    m <- lerp(m, g, 1 - b1);  v <- lerp(v, g*g, 1 - b2)
    u  = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    p <- p * (1 - lr*wd);  p <- p - lr * u

Every op is elementwise, so it can run on any partition of the tensors with the same bits.
On CPUs it runs on chunks of :data:`CHUNK` elements, all ops on one chunk before the next:
the chunk and its two scratch buffers stay in cache, so the ten passes read and write memory
about once (the embedding and output head are most of these parameters: 77M of GPT-2 small's
163M). One pass per op over whole tensors, as the reference and ``torch._foreach_*`` do, streams
each 150 MB tensor through memory ten times and allocates three temporaries of its size.
On GPUs one ``torch._foreach_*`` call per op (few kernel launches) is the fast form.
"""
from __future__ import annotations

import torch

from .cautious import decay_

CHUNK = 1 << 16  # elements: with its two scratch buffers ~0.8 MB, inside a core's L2


def adam_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
              exp_avg_sqs: list[torch.Tensor], steps: list[int], *, lr: float,
              betas: tuple[float, float], eps: float, weight_decay: float,
              cautious_wd: bool = False) -> None:
    """One AdamW step of local (non-DTensor) tensors; ``steps[i]`` is parameter i's step count
    after this step (bias corrections ``1 - beta^t``)."""
    b1, b2 = betas
    bc1 = [1 - b1 ** t for t in steps]
    bc2 = [1 - b2 ** t for t in steps]
    args = (lr, b1, b2, eps, weight_decay, cautious_wd)
    chunked = [p.device.type == "cpu" and p.is_contiguous() and m.is_contiguous()
               and v.is_contiguous() for p, m, v in zip(params, exp_avgs, exp_avg_sqs)]
    scratch: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in (i for i, c in enumerate(chunked) if c):
        dt = params[i].dtype
        if dt not in scratch:
            scratch[dt] = (torch.empty(CHUNK, dtype=dt), torch.empty(CHUNK, dtype=dt))
        _chunked(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], bc1[i], bc2[i], scratch[dt],
                 *args)
    rest = [i for i, c in enumerate(chunked) if not c]
    if rest:
        _foreach(*([x[i] for i in rest] for x in (params, grads, exp_avgs, exp_avg_sqs, bc1, bc2)),
                 *args)


def _chunked(p, g, m, v, bc1, bc2, scratch, lr, b1, b2, eps, weight_decay, cautious_wd):
    p, g, m, v = p.view(-1), g.reshape(-1), m.view(-1), v.view(-1)
    n = p.numel()
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        pc, gc, mc, vc = p[s:e], g[s:e], m[s:e], v[s:e]
        den, upd = scratch[0][:e - s], scratch[1][:e - s]
        mc.lerp_(gc, 1 - b1)
        torch.mul(gc, gc, out=den)
        vc.lerp_(den, 1 - b2)
        torch.div(vc, bc2, out=den)
        den.sqrt_().add_(eps)
        torch.div(mc, bc1, out=upd).div_(den)
        if weight_decay:  # p * 1.0 is p: skipping the pass changes no bit
            decay_(pc, upd, lr, weight_decay, cautious_wd)
        pc.add_(upd, alpha=-lr)


def _foreach(ps, grads, m, v, bc1, bc2, lr, b1, b2, eps, weight_decay, cautious_wd):
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_lerp_(v, torch._foreach_mul(grads, grads), 1 - b2)
    den = torch._foreach_div(v, bc2)
    torch._foreach_sqrt_(den)
    torch._foreach_add_(den, eps)
    upd = torch._foreach_div(m, bc1)
    torch._foreach_div_(upd, den)
    if cautious_wd and weight_decay:
        for p, u in zip(ps, upd):
            decay_(p, u, lr, weight_decay, True)
    else:
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
    torch._foreach_add_(ps, upd, alpha=-lr)
