"""The DP-SGD gradient: clip each example, sum, add Gaussian noise once, normalize.

Abadi et al. 2016, Alg. 1 with Poisson sampling as analysed by Mironov et al. 2019:

    g_hat = ( sum_i  c_i g_i  +  N(0, sigma^2 C^2 I) ) / (q N)

``flat`` clipping: c_i = min(1, C / ||g_i||) over all parameters.  ``per_layer``: each
parameter tensor k is clipped to C_k = C / sqrt(K), so the whole example still has norm
<= sqrt(sum_k C_k^2) = C and the same noise sigma*C covers it (McMahan et al. 2018, Sec. 3).
The denominator q N is the EXPECTED batch size: dividing by the realized one would make
the normalization data dependent (Opacus does the same).

Under DDP every rank clips its own examples, rank 0 alone adds the noise, and one SUM
all-reduce of the flat vector yields the global noisy sum on every rank.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .per_sample import PerSampleGradients, Piece

CLIPPING = ("flat", "per_layer")


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """c_i = min(1, C / ||g_i||). The relative slack (64 ulp) and the absolute 1e-6 keep
    c_i ||g_i|| <= C although the ghost norm and the released sum round differently."""
    slack = 1 + 64 * torch.finfo(norms.dtype).eps
    return (max_norm / (norms * slack + 1e-6)).clamp(max=1.0)


def finite_clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """:func:`clip_factors`, and 0 where a norm is not finite: such an example adds exactly 0,
    a public rule with no stop or log that would tell anyone it happened (issue 23, item 1)."""
    c = clip_factors(norms, max_norm)
    return torch.where(torch.isfinite(norms), c, torch.zeros((), dtype=c.dtype, device=c.device))


def clipped_sum(pieces: dict[nn.Parameter, Piece], params: list[nn.Parameter],
                max_grad_norm: float, clipping: str = "flat"
                ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """(sum_i c_i g_i per parameter, per-example norms before clipping, batch size)."""
    if clipping not in CLIPPING:
        raise ValueError(f"clipping={clipping!r}: choose one of {CLIPPING}")
    present = [p for p in params if p in pieces]
    B = pieces[present[0]].norm2().shape[0] if present else 0
    if not present or B == 0:
        return [torch.zeros_like(p) for p in params], torch.zeros(0), 0
    norm2 = {p: pieces[p].norm2() for p in present}
    total = torch.sqrt(sum(norm2.values()))
    # a non-finite example's stored rows are zeroed too: 0 * inf would be NaN in the sum
    finite = torch.isfinite(total)
    for p in present:
        pieces[p].keep_rows(finite)
    if clipping == "flat":
        c = finite_clip_factors(total, max_grad_norm)
        sums = {p: pieces[p].weighted_sum(c) for p in present}
    else:
        per = max_grad_norm / math.sqrt(len(params))
        sums = {p: pieces[p].weighted_sum(finite_clip_factors(
            torch.where(finite, norm2[p].sqrt(), total), per)) for p in present}
    return [sums[p] if p in sums else torch.zeros_like(p) for p in params], total, B


def noisy_mean_(params: list[nn.Parameter], sums: list[torch.Tensor], noise_std: float,
                expected_batch_size: float, generator: torch.Generator | None = None,
                add_noise: bool = True, group=None, noise: Callable | None = None) -> None:
    """Write ``(sum + N(0, noise_std^2)) / expected_batch_size`` into each ``p.grad``.

    With torch.distributed initialized the sums of all ranks are added; only ranks with
    ``add_noise`` (rank 0) contribute noise, so it enters the global sum exactly once.
    ``noise(n, std, generator, device, dtype)``, when given, returns the flat noise
    vector instead of the independent draw (correlated noise, :mod:`.correlated`); it is
    only read (it may be the noise state itself), the sum goes into a new buffer.
    """
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    device = sums[0].device if sums else None
    n = sum(s.numel() for s in sums)
    i = 0
    if add_noise and noise_std > 0 and noise is not None:  # read-only noise: add out of place
        x = noise(n, noise_std, generator, device, dtype)
        flat = torch.empty(n, device=device, dtype=dtype)
        for s in sums:
            torch.add(x[i:i + s.numel()], s.reshape(-1), out=flat[i:i + s.numel()])
            i += s.numel()
    else:
        if add_noise and noise_std > 0:  # fp32+ whatever the precision; one draw for all
            flat = torch.normal(0.0, noise_std, (n,), generator=generator, device=device,
                                dtype=dtype)
        else:
            flat = torch.zeros(n, device=device, dtype=dtype)
        for s in sums:
            flat[i:i + s.numel()] += s.reshape(-1)
            i += s.numel()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= expected_batch_size
    i = 0
    for p in params:
        p.grad = flat[i:i + p.numel()].view_as(p).to(p.dtype)
        i += p.numel()


def privatize_(engine: PerSampleGradients, max_grad_norm: float, noise_multiplier: float,
               expected_batch_size: float, clipping: str = "flat",
               generator: torch.Generator | None = None, add_noise: bool | None = None,
               group=None, clipped: tuple | None = None, noise: Callable | None = None) -> dict:
    """Replace every ``.grad`` of ``engine.params`` by the DP-SGD gradient of the batch the
    engine captured, or of ``clipped`` = (sums, norms, B) computed elsewhere
    (:mod:`.isolated`). Returns the batch size and the per-example norms (private: never
    log them). ``add_noise`` defaults to "this is rank 0"; ``noise`` as in
    :func:`noisy_mean_`."""
    if max_grad_norm <= 0 or noise_multiplier < 0 or expected_batch_size <= 0:
        raise ValueError("need max_grad_norm > 0, noise_multiplier >= 0, expected_batch_size > 0")
    if add_noise is None:
        add_noise = not (dist.is_available() and dist.is_initialized()) or dist.get_rank(group) == 0
    sums, norms, B = clipped if clipped is not None else \
        clipped_sum(engine.pieces(), engine.params, max_grad_norm, clipping)
    noisy_mean_(engine.params, sums, noise_multiplier * max_grad_norm, expected_batch_size,
                generator, add_noise, group, noise)
    engine.clear()
    # tensors, not floats: reading them would synchronize with the device every step
    return {"batch_size": B, "norms": norms.detach()}
