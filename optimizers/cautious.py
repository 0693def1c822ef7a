"""Cautious weight decay (Chen et al. 2025, "Cautious Weight Decay", arXiv 2510.12402).

Decoupled decay is applied only on the coordinates where the update and the parameter agree in
sign (the paper's update rule):

    x_{t+1} = x_t - lr * (u_t + wd * 1[u_t * x_t >= 0] * x_t)

where ``x_t - lr * u_t`` is the optimizer's own step. A coordinate the update already moves
towards zero is decayed; one it moves away from zero is left to the optimizer, so decay no
longer fights the update (the paper shows the iteration then keeps the original loss's
stationary points, which plain decoupled decay changes). The mask is ``>= 0``, as in the paper
and nanochat's fused Muon step, so a zero update coordinate is decayed as plain decay would.

:func:`decay_` is what the matrix optimizers (Muon and its subclasses) call; :func:`cautious`
turns a torch optimizer class (AdamW, Adam, SGD) into one with a ``cautious_wd`` option: its step
runs with the group's decay set to zero, then the masked decoupled decay is applied with the
update read off the step (``u = (x_t - x_{t+1}) / lr``, only its sign is used). For Adam and SGD,
whose own ``weight_decay`` is an L2 term added to the gradient, ``cautious_wd=True`` therefore
means the paper's decoupled masked decay (AdamW / SGDW form), not a masked L2 term. It keeps a
copy of the decayed parameters for the step (one parameter-sized buffer). Pure torch.
"""
from __future__ import annotations

import torch


def decay_(p: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float,
           cautious: bool) -> None:
    """``p <- p - lr * wd * p`` before an update ``p <- p - lr * s * update`` (``s > 0``), only
    where ``update * p >= 0`` when ``cautious``; plain decoupled decay (bitwise the old
    ``p.mul_(1 - lr * wd)``) otherwise."""
    if not cautious:
        p.mul_(1 - lr * weight_decay)
    elif weight_decay != 0:
        value = -lr * weight_decay
        if p.ndim == 0 or p.device.type != "cpu" or hasattr(p, "device_mesh"):  # DTensor: whole
            p.addcmul_(p, (update * p >= 0).to(p.dtype), value=value)
            return
        # CPU: row blocks of ~64K elements, so the product, mask and decay of a block stay in
        # cache instead of three parameter-sized temporaries (elementwise: the same bits).
        rows = max(1, (1 << 16) // max(1, p[0].numel()))
        for pc, uc in zip(p.split(rows), update.split(rows)):
            pc.addcmul_(pc, (uc * pc >= 0).to(pc.dtype), value=value)


def check_cautious(cautious_wd) -> bool:
    if not isinstance(cautious_wd, bool):
        raise ValueError(f"cautious_wd must be true or false, got {cautious_wd!r}")
    return cautious_wd


def _unhooked_step(base: type):
    """``base.step`` without torch's hook wrapper: torch wraps the ``step`` of every optimizer
    class it instantiates (``Optimizer._patch_step_function``), so once a plain ``base`` has
    been built, ``super().step()`` from a subclass's (also wrapped) step would run every
    step pre/post hook twice (Langevin noise added twice, a step counted twice)."""
    step = base.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


def cautious(base: type) -> type:
    """A subclass of torch optimizer ``base`` accepting ``cautious_wd`` (default False: the
    step is ``base``'s, bitwise). Registered in place of ``base`` for adamw, adam and sgd."""

    class Cautious(base):
        __doc__ = f"{base.__name__} with a ``cautious_wd`` option (optimizers.cautious)."

        def __init__(self, params, *args, cautious_wd: bool = False, **kw):
            super().__init__(params, *args, **kw)
            check_cautious(cautious_wd)
            self.defaults["cautious_wd"] = cautious_wd
            for g in self.param_groups:
                g.setdefault("cautious_wd", cautious_wd)

        @torch.no_grad()
        def step(self, closure=None):
            groups = [g for g in self.param_groups if g.get("cautious_wd") and g["weight_decay"]]
            if not groups:
                return _unhooked_step(base)(self, closure)
            decays = [g["weight_decay"] for g in groups]
            before = [[p.detach().clone() for p in g["params"]] for g in groups]
            for g in groups:
                g["weight_decay"] = 0.0
            try:
                loss = _unhooked_step(base)(self, closure)
            finally:
                for g, wd in zip(groups, decays):
                    g["weight_decay"] = wd
            for g, wd, olds in zip(groups, decays, before):
                for p, old in zip(g["params"], olds):
                    if p.grad is None:  # not stepped: torch leaves it undecayed too
                        continue
                    mask = ((old - p) * old >= 0).to(p.dtype)  # sign(u) = sign(old - new)
                    p.addcmul_(old, mask, value=-g["lr"] * wd)
            return loss

    Cautious.__name__ = Cautious.__qualname__ = base.__name__
    Cautious.__module__ = __name__
    return Cautious


AdamW = cautious(torch.optim.AdamW)
Adam = cautious(torch.optim.Adam)
SGD = cautious(torch.optim.SGD)
