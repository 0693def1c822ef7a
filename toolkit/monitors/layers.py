"""Finding the residual-stream blocks, their branches and heads in common model layouts.

``find_blocks(model)`` returns the members of the largest ``nn.ModuleList`` whose members
share one class: ``GPT.blocks`` in the toolkit, ``TransformerEncoder.layers`` in torch,
``encoder.layer`` / ``transformer.h`` / ``model.layers`` in Hugging Face transformers.
Each block's output is the residual stream after that block (Sun et al. 2024, Sec. 2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from optimizers.heads import HEAD_NAMES, find_head  # noqa: F401  (shared with the factory)

# Sub-modules whose output is a branch added to the residual stream, tried in order.
ATTN_BRANCHES = ("attn", "self_attn", "attention.output.dense", "attention")
MLP_BRANCHES = ("mlp", "feed_forward", "ffn", "output.dense", "linear2")


@dataclass
class Layer:
    """One residual-stream block: its full module name and whether it is sequence-first."""
    name: str
    module: nn.Module
    seq_first: bool = False  # nn.TransformerEncoderLayer(batch_first=False) gives (T, B, C)

    def hidden(self, out) -> torch.Tensor:
        """The block's hidden state as (B, T, C) from whatever the block returns."""
        h = first_tensor(out)
        if h.ndim == 2:
            h = h.unsqueeze(0)
        return h.transpose(0, 1) if self.seq_first else h


def first_tensor(out) -> torch.Tensor:
    """HF blocks return tuples/ModelOutputs; the hidden state is their first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    for o in out:
        if isinstance(o, torch.Tensor):
            return o
    raise TypeError(f"module output of type {type(out).__name__} holds no tensor")


def _seq_first(module: nn.Module) -> bool:
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    return False


def find_blocks(model: nn.Module) -> list[Layer]:
    """The largest ``nn.ModuleList`` of same-class blocks (ties: the outermost)."""
    best, best_name = None, None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if len({type(b) for b in m}) != 1 or isinstance(m[0], (nn.Linear, nn.Embedding)):
            continue
        if best is None or len(m) > len(best):
            best, best_name = m, name
    if best is None:
        raise ValueError(f"no nn.ModuleList of blocks found in {type(model).__name__}: pass "
                         "layers=[module names] naming the residual-stream blocks")
    prefix = f"{best_name}." if best_name else ""
    return [Layer(f"{prefix}{i}", b, _seq_first(b)) for i, b in enumerate(best)]


def resolve_layers(model: nn.Module, layers: str | Sequence[str] = "auto") -> list[Layer]:
    """``"auto"`` -> :func:`find_blocks`; a list of module names -> those modules."""
    if isinstance(layers, str):
        if layers != "auto":
            raise ValueError(f"layers={layers!r}: give 'auto' or a list of module names")
        return find_blocks(model)
    modules = dict(model.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of {type(model).__name__}; "
                         f"some names it has: {[n for n in modules if n][:15]}")
    return [Layer(n, modules[n], _seq_first(modules[n])) for n in layers]


def find_branch(block: nn.Module, candidates: Iterable[str]) -> tuple[str, nn.Module] | None:
    """The first dotted sub-module name of ``block`` from ``candidates`` that exists."""
    modules = dict(block.named_modules())
    for c in candidates:
        if c in modules:
            return c, modules[c]
    return None


class Hooks:
    """Forward hooks that exist only while a monitor is measuring (removed by ``remove``)."""

    def __init__(self):
        self.handles: list = []

    def forward(self, module: nn.Module, fn, with_kwargs: bool = False) -> None:
        self.handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def pre(self, module: nn.Module, fn, with_kwargs: bool = False) -> None:
        self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def call_model(model: nn.Module, batch):
    """Run ``model`` on a batch: a tensor, a dict of keyword inputs (HF), or an (x, y) pair."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    raise TypeError(f"batch of type {type(batch).__name__}: give a tensor, a dict of model "
                    "inputs or an (inputs, targets) pair")
