
import pytest
import torch
from torch import nn

import optimizers
from optimizers import build_optimizer, classify_parameters, lr_factor, param_groups
from toolkit.models import GPT, GPTConfig, SmallCNN


def kinds(model, **kw):
    return {k: sorted(n for n, _ in v) for k, v in classify_parameters(model, **kw).items()}


def test_gpt_groups_follow_timm_rules():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True))
    k = kinds(model)
    assert k["embedding"] == ["wpe.weight", "wte.weight"]
    assert k["head"] == ["lm_head.weight"]
    assert "blocks.0.attn.c_attn.weight" in k["hidden"] and "blocks.1.mlp.c_proj.weight" in k["hidden"]
    assert all(n.endswith("weight") and ".ln_" in n or n.startswith("ln_f") for n in k["gain"])
    assert all(n.endswith("bias") for n in k["bias"])
    total = sum(len(v) for v in k.values())
    assert total == len(list(model.parameters()))
    groups = param_groups(model, weight_decay=0.1)
    for g in groups:
        assert g["use_muon"] == (g["kind"] == "hidden")
        assert g["weight_decay"] == (0.1 if g["kind"] in ("hidden", "head") else 0.0)
        assert len(g["param_names"]) == len(g["params"])


def test_cnn_conv_filters_are_hidden_and_head_found_by_name():
    k = kinds(SmallCNN(norm="group"))
    assert "features.0.weight" in k["hidden"]  # 4-D conv filter, Muon views it as 2-D
    assert k["head"] == ["head.weight"]
    assert "features.1.weight" in k["gain"]  # GroupNorm gain


def test_head_falls_back_to_last_linear_and_can_be_named():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert kinds(model)["head"] == ["2.weight"]
    assert kinds(model, head_names=["0"])["head"] == ["0.weight"]
    with pytest.raises(ValueError, match="not modules"):
        kinds(model, head_names=["nope"])


def test_shared_parameters_are_grouped_once():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    model.lm_head.weight = model.wte.weight  # tied
    seen = [id(p) for g in param_groups(model) for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))


def test_build_optimizer_errors_name_the_fix():
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="registered"):
        build_optimizer(model, "nonexistent")
    with pytest.raises(ValueError, match=r"'adamw' has no option\(s\) \['momentum_typo'\]; it accepts .*'betas'"):
        build_optimizer(model, "adamw", momentum_typo=0.9)


# Options a subclass inherits from Muon but does not use must fail, not be ignored.
@pytest.mark.parametrize("name,option", [("auon", "ns_steps"), ("hyperp", "adjust_lr"),
                                         ("muonpp", "adjust_lr")])
def test_inherited_but_unused_options_are_refused(name, option):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    value = {"ns_steps": 3, "adjust_lr": "match_rms_adamw"}[option]
    with pytest.raises(ValueError, match=f"does not use '{option}'"):
        build_optimizer(model, name, **{option: value})
    cls = type(build_optimizer(model, name))
    with pytest.raises(ValueError, match=f"does not use '{option}'"):  # the class itself too
        cls(param_groups(model), **{option: value})
    assert option not in optimizers.optimizer_defaults(name)


def test_every_listed_option_is_accepted_by_its_optimizer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    for name in optimizers.model_optimizers():
        options = {k: v for k, v in optimizers.optimizer_defaults(name).items() if k != "lr"}
        opt = build_optimizer(model, name, **{k: v for k, v in options.items() if k != "weight_decay"})
        assert isinstance(opt, torch.optim.Optimizer)


def test_muonpp_says_when_it_replaces_the_hidden_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"1/spectral_target = 0.5.*replacing \[0.1\]"):
        opt = build_optimizer(model, "muonpp", weight_decay=0.1, spectral_target=2.0)
    decays = {g["kind"]: g["weight_decay"] for g in opt.param_groups}
    assert decays["hidden"] == 0.5 and decays["head"] == 0.1
    opt = build_optimizer(model, "muonpp", weight_decay=0.1, spectral_target=None)
    assert {g["kind"]: g["weight_decay"] for g in opt.param_groups}["hidden"] == 0.1


def test_a_registered_class_gets_a_record_with_its_options():
    class Toy(torch.optim.SGD):
        def __init__(self, params, lr=0.3, flavour: str = "plain"):
            super().__init__(params, lr=lr)
    optimizers.register("toy_record_test", Toy, description="a toy")
    try:
        rec = optimizers.OPTIMIZERS["toy_record_test"]
        assert rec.optimizer_class is Toy and rec.default_lr() == 0.3
        assert optimizers.optimizer_defaults("toy_record_test") == {"lr": 0.3, "weight_decay": 0.0,
                                                                    "flavour": "plain"}
        with pytest.raises(ValueError, match=r"accepts \['flavour'\]"):
            build_optimizer(nn.Linear(2, 2), "toy_record_test", flavor="x")
    finally:
        del optimizers.OPTIMIZERS["toy_record_test"]


def test_build_optimizer_accepts_groups_and_plain_params():
    model = nn.Linear(3, 3)
    opt = build_optimizer(model.parameters(), "sgd", lr=0.1, weight_decay=0.01)
    assert opt.param_groups[0]["weight_decay"] == 0.01
    opt = build_optimizer([{"params": [model.weight]}, {"params": [model.bias], "weight_decay": 0}],
                          "adamw", lr=0.1, weight_decay=0.5, betas=[0.8, 0.9])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("name", optimizers.model_optimizers())
def test_every_registered_optimizer_trains_a_small_model(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 0.5
    opt = build_optimizer(model, name, lr=0.02)
    loss0 = nn.functional.mse_loss(model(x), y).item()
    for _ in range(30):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    assert nn.functional.mse_loss(model(x), y).item() < loss0


def test_schedule_shape():
    f = lambda s, **kw: lr_factor(s, 100, **kw)
    assert f(0, warmup_steps=10) == pytest.approx(0.1)
    assert f(9, warmup_steps=10) == pytest.approx(1.0)
    assert f(10, warmup_steps=10) == pytest.approx(1.0)
    assert f(100, warmup_steps=10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert f(55, warmup_steps=10, decay="cosine") == pytest.approx(0.5)
    assert f(55, warmup_steps=10, decay="linear") == pytest.approx(0.5)
    assert f(80, decay="constant") == 1.0
    with pytest.raises(ValueError, match="unknown lr decay"):
        optimizers.warmup_decay(build_optimizer(nn.Linear(2, 2)), 10, decay="exp")


def test_optimizers_package_does_not_import_lightning():
    import subprocess
    import sys
    code = ("import sys, optimizers; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning')]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_classifier_archs_forward_shapes():
    from toolkit import Classifier
    for arch in ("cnn", "mlp"):
        model = Classifier(arch=arch, num_classes=7)
        assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)
        assert kinds(model.model)["head"] == ["head.weight"]
