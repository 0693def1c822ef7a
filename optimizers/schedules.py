"""Learning-rate schedules: linear warmup, then cosine or linear decay (pure torch)."""
from __future__ import annotations

import math

import torch

DECAYS = ("cosine", "linear", "constant")


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, decay: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
    return min_lr_ratio + (1 - min_lr_ratio) * shape


def warmup_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 decay: str = "cosine", min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    if decay not in DECAYS:
        raise ValueError(f"unknown lr decay {decay!r}; choose one of {DECAYS}")
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, "
                         f"{total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, decay, min_lr_ratio))
