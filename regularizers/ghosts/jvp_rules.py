"""Leaner forward-mode rules for the layers that dominate a JVP (pure torch).

Inside ``lean_jvp_rules()``, ``F.linear``, ``F.conv1d/2d/3d`` and ``F.group_norm`` called with
dual tensors (``torch.autograd.forward_ad``) compute their tangent by the same formulas as
torch's built-in rules, in fewer passes:

* linear / convolution (bilinear in input and weight):
  d op(x, W, b) = op(x, dW, db) + op(dx, W), the second term only where the input carries a
  tangent (torch's rule also convolves / multiplies a materialized zero tangent of a plain
  input, e.g. the batch entering the first layer);
* group norm, x_hat = (x - mu) * rstd per (example, group) (Wu & He 2018, eq. 1), y = gamma
  x_hat + beta:  dy = gamma * rstd * (dx - mean(dx) - x_hat * mean(dx * x_hat))
  + x_hat * dgamma + dbeta, with mu and rstd from the primal ``native_group_norm`` (torch's
  decomposed rule re-derives the statistics in about twice as many passes over the input).

Every other function runs unchanged, under torch's own forward-mode rule.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _split(t):
    return (None, None) if t is None else fwAD.unpack_dual(t)


def _bilinear(op):
    def rule(input, weight, bias=None, *args, **kwargs):
        xp, xt = _split(input)
        wp, wt = _split(weight)
        bp, bt = _split(bias)
        out = op(xp, wp, bp, *args, **kwargs)
        tan = None
        if wt is not None or bt is not None:
            tan = op(xp, torch.zeros_like(wp) if wt is None else wt, bt, *args, **kwargs)
        if xt is not None:
            dx = op(xt, wp, None, *args, **kwargs)
            tan = dx if tan is None else tan.add_(dx)
        return out if tan is None else fwAD.make_dual(out, tan)
    return rule


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    xp, xt = _split(input)
    wp, wt = _split(weight)
    bp, bt = _split(bias)
    n, c, g = xp.shape[0], xp.shape[1], num_groups
    out, mean, rstd = torch.native_group_norm(xp, wp, bp, n, c, xp[0, 0].numel(), g, eps)
    if xt is None and wt is None and bt is None:
        return out
    x4 = xp.reshape(n, g, c // g, -1)  # (example, group, channel in group, position)
    mean, rstd = mean.reshape(n, g, 1, 1), rstd.reshape(n, g, 1, 1)
    xhat = (x4 - mean).mul_(rstd)
    per_channel = lambda v: v.reshape(1, g, c // g, 1)  # noqa: E731
    if xt is not None:
        t4 = xt.reshape(n, g, c // g, -1)
        m1 = t4.mean((2, 3), keepdim=True)
        m2 = torch.linalg.vecdot(t4.reshape(n, g, -1), xhat.reshape(n, g, -1)) / t4[0, 0].numel()
        scale = rstd if wp is None else rstd * per_channel(wp)
        tan = (t4 - m1).addcmul_(xhat, m2.reshape(n, g, 1, 1), value=-1).mul_(scale)
    else:
        tan = torch.zeros_like(x4)
    if wt is not None:
        tan.addcmul_(xhat, per_channel(wt))
    if bt is not None:
        tan.add_(per_channel(bt))
    return fwAD.make_dual(out, tan.reshape(xp.shape))


_RULES = {F.linear: _bilinear(F.linear), F.conv1d: _bilinear(F.conv1d),
          F.conv2d: _bilinear(F.conv2d), F.conv3d: _bilinear(F.conv3d),
          F.group_norm: _group_norm}


class lean_jvp_rules(TorchFunctionMode):
    """Context: the rules above for the functions they cover, torch's elsewhere."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rule = _RULES.get(func)
        return (rule or func)(*args, **(kwargs or {}))
