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


def test_adamw_relaxes_to_its_fixed_point_with_timescale_tau():
    # constant gradient: Adam's normalized step is a constant u (|u| = eta), so the weights are
    # an EMA of -u / (eta lambda) with per-step factor (1 - eta lambda); counting steps until
    # the gap to that fixed point is down by e^-1 gives tau * steps (Power Lines' timescale)
    steps, lr, tau = 500, 0.02, 0.1
    lam = weight_decay_from_tau(tau, lr, batch_size=8 * 64, dataset_size=steps * 8 * 64)
    p = nn.Parameter(torch.full((4,), 3.0, dtype=torch.float64))
    g = torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=lam, betas=(0.0, 0.99))
    fixed = -torch.sign(g) / lam  # where decay and the unit-size Adam step balance
    gap0, n = (p.detach() - fixed).abs(), 0
    while ((p.detach() - fixed).abs() > gap0 / math.e).any():
        p.grad = g.clone()
        opt.step()
        n += 1
    assert abs(n - tau * steps) <= 1 + 0.02 * tau * steps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_cli_recipe_applies_lambda_from_tau_of_its_run(accumulate, tmp_path, monkeypatch):
    # the recipe through the CLI: lambda on the decayed groups equals B / (eta tau D) for the
    # run's effective batch B (sequences x accumulation) and tokens D = optimizer steps x B x T
    from toolkit.cli import RECIPES, main
    import yaml
    monkeypatch.chdir(tmp_path)
    recipe = RECIPES / "powerlines_wd_lm.yaml"
    cfg = yaml.safe_load(recipe.read_text())["model"]["init_args"]
    # the data's block_size sets the model's too (the CLI's argument link)
    steps, batch, T = 3, 4, yaml.safe_load(recipe.read_text())["data"]["init_args"]["block_size"]
    main(["fit", "--config", str(recipe), "--trainer.max_steps", str(steps),
          "--trainer.accumulate_grad_batches", str(accumulate), "--data.batch_size", str(batch),
          "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3"])
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)
    groups = {g["kind"]: g for g in ckpt["optimizer_states"][0]["param_groups"]}
    B, D = batch * accumulate, steps * accumulate * batch * T
    tau, lr = cfg["optimizer_kwargs"]["weight_decay_rule"]["tau"], cfg["lr"]
    for kind in ("hidden", "head"):
        assert groups[kind]["weight_decay"] == pytest.approx(B * T / (lr * tau * D))
    assert groups["embedding"]["weight_decay"] == groups["gain"]["weight_decay"] == 0.0


@pytest.mark.parametrize("width", [64, 128, 256])
def test_layerwise_rule_on_the_gpt_across_widths(width):
    # the LanguageModel's own groups at widths 64-256 against base width 64: hidden lr x 64/d,
    # hidden decay x sqrt(d / 64), head and embedding unchanged, gains decay-free
    from toolkit import LanguageModel
    lr, wd = 0.01, 0.5
    model = LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=width,
                          lr=lr, weight_decay=wd, lr_decay="constant", optimizer_kwargs={
                              "weight_decay_rule": {"kind": "layerwise", "width": width,
                                                    "base_width": 64}})
    opt = model.configure_optimizers()["optimizer"]
    got = {g["kind"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert got["hidden"] == (pytest.approx(lr * 64 / width), pytest.approx(wd * (width / 64) ** 0.5))
    assert got["head"] == (lr, wd) and got["embedding"] == (lr, 0.0) and got["gain"][1] == 0.0
    n_hidden = sum(len(g["params"]) for g in opt.param_groups if g["kind"] == "hidden")
    assert n_hidden == 2 * 4  # qkv, attention out, mlp in, mlp out per block: all get the rule


def test_power_lines_warns_when_a_step_would_wipe_the_weights():
    with pytest.warns(UserWarning, match="tau \\* steps <= 1"):
        optimizers.build_optimizer(_Net(), "adamw", lr=0.1,
                                   weight_decay_rule={"kind": "power_lines", "tau": 0.5, "steps": 2})
