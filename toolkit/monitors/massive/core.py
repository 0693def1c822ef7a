"""Massive activations (Sun, Chen, Kolter, Liu 2024, "Massive Activations in Large Language
Models"): a few residual-stream scalars orders of magnitude above the rest, at fixed
feature dimensions and on the first token or delimiters. Criterion (their Sec. 2):
|a| > 100 and about 1000x the median |a| of that hidden state.

``activation_stats`` is the pure core on one hidden state; ``massive_activations`` runs a
model once with temporary hooks on its blocks; the history is a CSV (``write_history``).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..layers import Hooks, Layer, call_model, resolve_layers


ABS_THRESHOLD = 100.0


RATIO_THRESHOLD = 1000.0


CSV_FIELDS = ("step", "layer", "name", "top1", "median", "ratio", "batch", "token", "dim",
              "massive")


@dataclass
class ActivationStats:
    """Top-1 |a| of one block's output, where it sits, and how it compares to the median."""
    top1: float
    median: float
    ratio: float
    batch: int
    token: int
    dim: int
    top_values: list[float] = field(default_factory=list)
    top_positions: list[tuple[int, int]] = field(default_factory=list)  # (token, dim)
    massive: bool = False


def activation_stats(h: torch.Tensor, top_k: int = 5, abs_threshold: float = ABS_THRESHOLD,
                     ratio_threshold: float = RATIO_THRESHOLD) -> ActivationStats:
    """Statistics of a hidden state ``h`` of shape (B, T, C) (or (T, C)).

    ``massive`` is Sun et al.'s criterion: top-1 |a| > ``abs_threshold`` and at least
    ``ratio_threshold`` times the median |a|.
    """
    if h.ndim == 2:
        h = h.unsqueeze(0)
    if h.ndim != 3:
        raise ValueError(f"hidden state of shape {tuple(h.shape)}: expected (B, T, C)")
    a = h.detach().abs().float()
    flat = a.reshape(-1)
    vals, idx = flat.topk(min(top_k, flat.numel()))
    median = flat.median().item()
    T, C = a.shape[1], a.shape[2]
    pos = [(int(i) // C % T, int(i) % C) for i in idx.tolist()]
    top1 = vals[0].item()
    ratio = top1 / max(median, 1e-30)
    return ActivationStats(top1, median, ratio, int(idx[0]) // (T * C), pos[0][0], pos[0][1],
                           vals.tolist(), pos, top1 > abs_threshold and ratio >= ratio_threshold)


class MassiveProbe:
    """Forward hooks on residual-stream blocks computing :func:`activation_stats` in place
    (no hidden state is kept). Only the first call of each block is recorded."""

    def __init__(self, layers: list[Layer], **stats_kw):
        self.layers, self.stats_kw = layers, stats_kw
        self.stats: dict[int, ActivationStats] = {}

    def attach(self, hooks: Hooks) -> None:
        self.stats = {}
        for i, layer in enumerate(self.layers):
            hooks.forward(layer.module, self._hook(i, layer))

    @torch.no_grad()
    def run(self, model: nn.Module, batch) -> None:
        """One eval-mode forward of ``batch`` with the hooks attached only for its duration."""
        was_training = model.training
        model.eval()
        try:
            with Hooks() as hooks:
                self.attach(hooks)
                call_model(model, batch)
        finally:
            model.train(was_training)

    def _hook(self, i: int, layer: Layer):
        def fn(module, args, out):
            if i not in self.stats:
                self.stats[i] = activation_stats(layer.hidden(out), **self.stats_kw)
        return fn


def massive_activations(model: nn.Module, batch, layers: str | Sequence[str] = "auto",
                        top_k: int = 5, abs_threshold: float = ABS_THRESHOLD,
                        ratio_threshold: float = RATIO_THRESHOLD) -> dict[str, ActivationStats]:
    """Per residual-stream block (module name -> stats) for one forward of ``batch`` in eval mode.

    ``layers="auto"`` takes the largest ``nn.ModuleList`` of blocks (toolkit GPT,
    ``nn.TransformerEncoder``, Hugging Face models); a list of module names overrides it.
    """
    resolved = resolve_layers(model, layers)
    probe = MassiveProbe(resolved, top_k=top_k, abs_threshold=abs_threshold,
                         ratio_threshold=ratio_threshold)
    probe.run(model, batch)
    return {resolved[i].name: s for i, s in sorted(probe.stats.items())}


def write_history(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    return path


def read_history(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no history at {path}: MassiveActivationMonitor writes "
                                "massive_activations.csv into the run folder at the end of fit")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    missing = [k for k in ("step", "layer", "ratio") if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; expected {CSV_FIELDS}")
    ints = ("step", "layer", "batch", "token", "dim", "massive")
    return [{k: (int(v) if k in ints else float(v) if k != "name" else v) for k, v in r.items()}
            for r in rows]
