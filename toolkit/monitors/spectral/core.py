"""Spectral condition for feature learning (Yang, Simon, Bernstein 2023, "A Spectral
Condition for Feature Learning", Condition 1): for a hidden weight matrix W of shape
(fan_out, fan_in), ||W||_2 and ||dW||_2 should be Theta(sqrt(fan_out / fan_in)).

``SpectralMonitor`` logs both ratios (norm / sqrt(fan_out/fan_in)) for every hidden
matrix on logging steps; dW is the change since the previous logging step. Spectral
norms come from power iteration warm-started with the vectors of the previous logging
step, so a few iterations per matrix track a slowly moving top singular pair. Under FSDP2
each sharded matrix is gathered whole on every rank, one at a time, when it is measured (a
collective: every rank runs the monitor), so the numbers are those of one process. Expert
stacks ``(E, fan_out, fan_in)`` of MoE layers (``optimizers.orientation.stacked_names``) are E
matrices: each expert is measured on its own and ``W/<name>`` (``dW/<name>``) is the largest
ratio over the experts.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def power_iteration(W: torch.Tensor, v: torch.Tensor | None = None, iters: int = 10,
                    tol: float = 0.0, generator: torch.Generator | None = None
                    ) -> tuple[float, torch.Tensor]:
    """Largest singular value of ``W`` (viewed as fan_out x fan_in) and its right vector.

    ``v`` warm-starts the iteration; ``tol`` > 0 stops early once the estimate changes
    by less than ``tol`` relative to itself.
    """
    M = W.detach().reshape(W.shape[0], -1).float()
    if v is None:
        v = torch.randn(M.shape[1], generator=generator, device=M.device)
    v = v.to(M.device, torch.float32)
    v = v / v.norm().clamp_min(1e-30)
    sigma = 0.0
    for _ in range(iters):
        u = M @ v
        u = u / u.norm().clamp_min(1e-30)
        w = M.T @ u
        new = w.norm().item()
        v = w / max(new, 1e-30) if new > 0 else v
        done = tol > 0 and abs(new - sigma) <= tol * max(new, 1e-30)
        sigma = new
        if done:
            break
    return sigma, v
