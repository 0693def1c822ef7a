"""Weight-decay rules: Power Lines' lambda = B / (eta tau D) and the layerwise rule (muP
eta ~ 1/d, lambda ~ sqrt(d)), checked against the formulas and against what torch's AdamW
actually does with the decay it is given."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

import optimizers
from optimizers import apply_weight_decay_rule, tau_from_weight_decay, weight_decay_from_tau


class _Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)


def test_lambda_from_tau_is_the_formula_and_inverts():
    B, D, lr, tau = 64, 1_000_000, 3e-3, 0.25
    lam = weight_decay_from_tau(tau, lr, batch_size=B, dataset_size=D)
    assert lam == pytest.approx(64 / (3e-3 * 0.25 * 1e6))
    assert tau_from_weight_decay(lam, lr, batch_size=B, dataset_size=D) == pytest.approx(tau)
    # one pass: B / D = 1 / steps
    assert weight_decay_from_tau(tau, lr, steps=D // B) == pytest.approx(lam)
    # doubling the batch doubles the optimal lambda at fixed tau (the paper's B-linear law)
    assert weight_decay_from_tau(tau, lr, batch_size=2 * B, dataset_size=D) == pytest.approx(2 * lam)


def test_adamw_with_that_lambda_forgets_with_timescale_tau():
    # zero gradients: AdamW only decays, p_t = p_0 (1 - eta lambda)^t; after tau * steps
    # steps (a fraction tau of the run) the weight is down by e^-1 (to O(eta lambda))
    steps, lr, tau = 400, 0.01, 0.25
    lam = weight_decay_from_tau(tau, lr, steps=steps)
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=lam)
    for _ in range(int(tau * steps)):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert float(p.detach()[0]) == pytest.approx(math.exp(-1), rel=lr * lam)


def test_factory_sets_power_lines_decay_on_decayed_groups_only():
    opt = optimizers.build_optimizer(_Net(), "adamw", lr=2e-3,
                                     weight_decay_rule={"kind": "power_lines", "tau": 0.5,
                                                        "batch_size": 32, "dataset_size": 32_000})
    want = 32 / (2e-3 * 0.5 * 32_000)
    by_kind = {g["kind"]: g["weight_decay"] for g in opt.param_groups}
    assert by_kind == {"hidden": pytest.approx(want), "head": pytest.approx(want),
                       "embedding": 0.0, "gain": 0.0, "bias": 0.0}


def test_module_fills_steps_of_the_run(tiny_mnist):
    from toolkit import Classifier, ImageDataModule
    model = Classifier(arch="mlp", hidden=[8], lr=1e-2, lr_decay="constant",
                       optimizer_kwargs={"weight_decay_rule": {"kind": "power_lines", "tau": 0.5}})
    L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(
        model, datamodule=ImageDataModule(root=str(tiny_mnist), val_size=100, batch_size=50))
    groups = {g["kind"]: g["weight_decay"] for g in model.optimizers().optimizer.param_groups}
    assert groups["hidden"] == pytest.approx(1 / (1e-2 * 0.5 * 5))


def test_layerwise_rule_scales_hidden_lr_as_1_over_d_and_decay_as_sqrt_d():
    base = {g["kind"]: g for g in optimizers.param_groups(_Net(16), 0.1)}
    wide = apply_weight_decay_rule(optimizers.param_groups(_Net(64), 0.1), 1e-3,
                                   {"kind": "layerwise", "width": 64, "base_width": 16})
    wide = {g["kind"]: g for g in wide}
    assert wide["hidden"]["lr"] == pytest.approx(1e-3 * 16 / 64)
    assert wide["hidden"]["weight_decay"] == pytest.approx(0.1 * math.sqrt(64 / 16))
    # the steady-state scale sqrt(eta / lambda) d^0.75 is then the same at both widths
    scale = lambda lr, wd, d: math.sqrt(lr / wd) * d ** 0.75
    assert scale(wide["hidden"]["lr"], wide["hidden"]["weight_decay"], 64) == pytest.approx(
        scale(1e-3, base["hidden"]["weight_decay"], 16))
    assert wide["head"]["weight_decay"] == 0.1 and "lr" not in wide["head"]
    assert wide["gain"]["weight_decay"] == wide["bias"]["weight_decay"] == 0.0
    opt = optimizers.build_optimizer(_Net(64), "adamw", lr=1e-3, weight_decay=0.1,
                                     weight_decay_rule={"kind": "layerwise", "width": 64,
                                                        "base_width": 16})
    hidden = next(g for g in opt.param_groups if g["kind"] == "hidden")
    assert (hidden["lr"], hidden["weight_decay"]) == (pytest.approx(2.5e-4), pytest.approx(0.2))


@pytest.mark.parametrize("rule,match", [
    ({"kind": "nope"}, "choose one of"),
    ({"kind": "power_lines"}, "needs tau"),
    ({"kind": "power_lines", "tau": 0.2}, "batch_size and dataset_size"),
    ({"kind": "power_lines", "tau": 0.2, "steps": 10, "batch_size": 4}, "not both"),
    ({"kind": "power_lines", "tau": -1, "steps": 10}, "tau=-1"),
    ({"kind": "power_lines", "tau": 0.2, "step": 10}, "unknown keys"),
    ({"kind": "layerwise", "width": 64}, "base_width"),
])
def test_bad_rules_name_the_problem(rule, match):
    with pytest.raises(ValueError, match=match):
        optimizers.build_optimizer(_Net(), "adamw", lr=1e-3, weight_decay_rule=rule)


def test_layerwise_needs_factory_groups():
    with pytest.raises(ValueError, match="pass a model"):
        optimizers.build_optimizer(list(_Net().parameters()), "adamw", lr=1e-3,
                                   weight_decay_rule={"kind": "layerwise", "width": 2,
                                                      "base_width": 1})
