"""Weight-decay rules for the factory's param groups (pure torch, no Lightning).

``power_lines``: Bergsma et al., "Power Lines: Scaling Laws for Weight Decay and Batch Size in
LLM Pre-training" (arXiv 2505.13738), after Wang & Aitchison: AdamW's weights are an EMA of
past updates with timescale tau_iter = 1 / (eta * lambda) steps, i.e. the fraction of the run

    tau = B / (eta * lambda * D)        =>   lambda = B / (eta * tau * D),

with B the batch and D the dataset (tokens or examples, the same unit), eta the peak lr and
lambda torch's decoupled AdamW decay (p <- p - eta * lambda * p). B / D = 1 / steps for one
pass, so ``steps`` may stand for both. The paper finds the best tau fixed at a given model and
data size (so the best lambda grows linearly with B).

``layerwise``: "Robust Layerwise Scaling Rules by Proper Weight Decay Tuning" (arXiv
2510.15262): in AdamW's steady state a matrix's top singular value scales as
sqrt(eta / lambda) * d^0.75; with muP's eta ~ 1/d for hidden matrices, lambda ~ sqrt(d) keeps it
width-invariant. Hidden matrices get eta = eta_0 * d_0 / d and lambda = lambda_0 * sqrt(d / d_0)
(d the model width, d_0 the width the base lr/decay were tuned at); vectors (gains, biases)
get lambda = 0; embeddings and the head keep the base values.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

RULES = ("power_lines", "layerwise")
_DECAYED = ("hidden", "head")  # the kinds the factory decays


def _positive(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name}={v!r} must be a finite number > 0")
    return float(v)


def _batch_over_data(batch_size=None, dataset_size=None, steps=None) -> float:
    if steps is not None and (batch_size is not None or dataset_size is not None):
        raise ValueError("give either steps or batch_size and dataset_size (B / D = 1 / steps), "
                         "not both")
    if steps is not None:
        return 1.0 / _positive("steps", steps)
    if batch_size is None or dataset_size is None:
        raise ValueError("the Power Lines rule needs batch_size and dataset_size (the run's "
                         "examples or tokens, same unit), or steps")
    return _positive("batch_size", batch_size) / _positive("dataset_size", dataset_size)


def weight_decay_from_tau(tau: float, lr: float, batch_size: float | None = None,
                          dataset_size: float | None = None, steps: float | None = None) -> float:
    """lambda = B / (eta * tau * D) (Power Lines' AdamW timescale solved for lambda)."""
    return _batch_over_data(batch_size, dataset_size, steps) / (_positive("lr", lr)
                                                                * _positive("tau", tau))


def tau_from_weight_decay(weight_decay: float, lr: float, batch_size: float | None = None,
                          dataset_size: float | None = None, steps: float | None = None) -> float:
    """tau = B / (eta * lambda * D), the EMA timescale as a fraction of the run."""
    return _batch_over_data(batch_size, dataset_size, steps) / (
        _positive("lr", lr) * _positive("weight_decay", weight_decay))


def apply_weight_decay_rule(groups: list[dict[str, Any]], lr: float, rule: dict[str, Any]
                            ) -> list[dict[str, Any]]:
    """New param groups with ``rule`` applied (see the module docstring):
    ``{"kind": "power_lines", "tau": ..., "batch_size": ..., "dataset_size": ...}`` (or
    ``"steps"``) sets lambda on the decayed groups (hidden, head; all groups when they carry no
    ``kind``) from each group's lr; ``{"kind": "layerwise", "width": d, "base_width": d0}``
    rescales hidden groups' lr and weight decay and zeroes the decay of gains and biases."""
    rule = dict(rule)
    kind = rule.pop("kind", None)
    if kind not in RULES:
        raise ValueError(f"weight_decay_rule kind={kind!r}: choose one of {RULES}, e.g. "
                         "{'kind': 'power_lines', 'tau': 0.2, 'steps': 1000}")
    out = []
    if kind == "power_lines":
        tau = rule.pop("tau", None)
        if tau is None:
            raise ValueError("the power_lines rule needs tau (the EMA timescale as a fraction of "
                             "the run, e.g. 0.2)")
        extra = sorted(set(rule) - {"batch_size", "dataset_size", "steps"})
        if extra:
            raise ValueError(f"power_lines rule: unknown keys {extra}; it takes tau, batch_size, "
                             "dataset_size, steps")
        for g in groups:
            decayed = g.get("kind", "hidden") in _DECAYED
            wd = weight_decay_from_tau(tau, g.get("lr", lr), **rule) if decayed else 0.0
            if g.get("lr", lr) * wd >= 1:  # (1 - eta lambda) <= 0: each step wipes the weights
                warnings.warn(f"power_lines rule: tau={tau} of a run this short gives eta * "
                              f"lambda = {g.get('lr', lr) * wd:.3g} >= 1 (tau * steps <= 1 step); "
                              "lengthen the run or raise tau", stacklevel=2)
            out.append({**g, "weight_decay": wd})
        return out
    extra = sorted(set(rule) - {"width", "base_width"})
    if extra or "width" not in rule or "base_width" not in rule:
        raise ValueError(f"layerwise rule takes width and base_width (got {sorted(rule)}), e.g. "
                         "{'kind': 'layerwise', 'width': 256, 'base_width': 64}")
    m = _positive("width", rule["width"]) / _positive("base_width", rule["base_width"])
    for g in groups:
        g = dict(g)
        if "kind" not in g:
            raise ValueError("the layerwise rule needs the factory's groups (each with a 'kind'): "
                             "pass a model to build_optimizer, not bare parameters")
        if g["kind"] == "hidden":
            g["lr"] = g.get("lr", lr) / m
            g["weight_decay"] = g["weight_decay"] * math.sqrt(m)
        elif g["kind"] in ("gain", "bias"):
            g["weight_decay"] = 0.0
        out.append(g)
    return out
