"""Finding a model's output layer (its "head"): the one rule the optimizer factory (heads get
their own param group: Muon and muP treat them apart from hidden matrices) and the monitors
(the output-logit z) share. Pure torch.

A head is a layer with its own parameters named like one: the toolkit's, timm's and Hugging
Face's conventional attribute names (BERT's MLM ``decoder``, sequence classification's
``score``). An autoencoder's ``decoder`` container is not a head: only a layer is.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

HEAD_NAMES = ("lm_head", "head", "classifier", "output_layer", "fc_out", "decoder", "score")


def named_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every layer (a module with parameters of its own) named like a head, in module order."""
    return [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in HEAD_NAMES
            and next(m.parameters(recurse=False), None) is not None]


def head_modules(model: nn.Module, head_names: Iterable[str] | None = None) -> set[str]:
    """The names of ``model``'s output layers: ``head_names`` when given (checked), else the
    layers named like a head, else the last ``nn.Linear`` (the output layer of nearly every
    feed-forward model; timm and Muon's docs make the same assumption)."""
    names = dict(model.named_modules())
    if head_names is not None:
        missing = [n for n in head_names if n not in names]
        if missing:
            raise ValueError(f"head_names {missing} are not modules of {type(model).__name__}; "
                             f"choose from {sorted(n for n in names if n)[:20]}...")
        return set(head_names)
    found = {n for n, _ in named_heads(model)}
    if found:
        return found
    linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
    return {linears[-1]} if linears else set()


def find_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The logit layer a monitor reads: the last ``nn.Linear`` named like a head, else None
    (no guess: a wrong layer's "logits" would be reported as the model's)."""
    found = [(n, m) for n, m in named_heads(model) if isinstance(m, nn.Linear)]
    return found[-1] if found else None
