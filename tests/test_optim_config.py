"""One optimizer configuration for every module class: the settings are declared once
(TrainModule / OptimizerConfig), an unset lr is the optimizer's registered default for every
module (the Hugging Face modules once trained Muon at 1e-3), and data.block_size sets the
model's through the CLI link."""
import inspect

import lightning as L
import pytest

import optimizers
import toolkit.modules as modules
from toolkit.cli import RECIPES, ToolkitCLI
from toolkit.modules import TrainModule
from toolkit.modules.optim_config import FIELDS, LM_DEFAULTS, OptimizerConfig

LLAMA = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
             vocab_size=11, bos_token_id=None, eos_token_id=None)
GPT2 = dict(model_type="gpt2", n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=11,
            pad_token_id=0)
# the smallest model of each module class; a new exported module class must be added here
SMALL = {
    "LanguageModel": dict(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8),
    "Classifier": dict(arch="mlp", hidden=[4], image_size=4, num_classes=3),
    "HFCausalLM": dict(config=LLAMA),
    "HFClassifier": dict(config=GPT2, num_classes=3),
    "SingleIndex": dict(dim=4, k=3),
}


def module_classes():
    return sorted((c for c in vars(modules).values()
                   if isinstance(c, type) and issubclass(c, TrainModule) and c is not TrainModule),
                  key=lambda c: c.__name__)


def test_every_exported_module_class_is_covered_here():
    assert {c.__name__ for c in module_classes()} == set(SMALL)


@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_no_module_redeclares_an_optimizer_setting(cls):
    # the seven settings live in TrainModule's signature only, so they cannot drift per class
    own = set(inspect.signature(cls.__init__).parameters)
    assert not own & set(FIELDS), f"{cls.__name__} redeclares {sorted(own & set(FIELDS))}"


@pytest.mark.parametrize("name", optimizers.model_optimizers())
@pytest.mark.parametrize("cls", module_classes(), ids=lambda c: c.__name__)
def test_unset_lr_is_the_registered_default_for_every_module(cls, name):
    module = cls(optimizer=name, lr_decay="constant", **SMALL[cls.__name__])
    want = optimizers.default_lr(name)
    assert module.optim.lr == want and module.hparams.lr == want
    opt = module.configure_optimizers()["optimizer"]
    # the optimizer really got it: every group without its own lr (Muon's adam_lr ...) has it
    hidden = [g for g in opt.param_groups if g.get("kind", "hidden") in ("hidden", "all")]
    if any(p.dim() >= 2 for p in module.parameters()):
        assert hidden and all(g["lr"] == pytest.approx(want) for g in hidden)
    else:  # vectors only (SingleIndex's direction): gains, at the optimizer's own gain lr
        assert not hidden


def test_hf_causal_lm_trains_muon_at_muons_lr_not_adamws():
    module = modules.HFCausalLM(optimizer="muon", **SMALL["HFCausalLM"])
    assert module.optim.lr == optimizers.default_lr("muon") == 0.02
    assert modules.HFClassifier(optimizer="muon", **SMALL["HFClassifier"]).optim.lr == 0.02


def test_class_defaults_and_given_values():
    lm = modules.LanguageModel(**SMALL["LanguageModel"])
    assert lm.optim == LM_DEFAULTS.resolve()  # LMs decay by 0.1 to 0.1 of the peak
    assert (lm.optim.weight_decay, lm.optim.min_lr_ratio) == (0.1, 0.1)
    clf = modules.Classifier(lr=0.3, weight_decay=0.05, **SMALL["Classifier"])
    assert (clf.optim.lr, clf.optim.weight_decay, clf.optim.min_lr_ratio) == (0.3, 0.05, 0.0)
    with pytest.raises(ValueError, match="ns_steps"):
        modules.Classifier(optimizer="auon", optimizer_kwargs={"ns_steps": 5}, **SMALL["Classifier"])
    with pytest.raises(TypeError, match="unknown optimizer setting"):
        OptimizerConfig().resolve(learning_rate=1.0)


def cli_model(*args):
    cli = ToolkitCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                     subclass_mode_data=True, run=False,
                     args=[*args, "--trainer.logger", "false"])
    return cli.model


def test_recipe_keys_reach_the_config_and_an_unset_lr_is_the_default():
    model = cli_model("--config", str(RECIPES / "hf_llama_muon.yaml"), "--model.init_args.lr", "null")
    assert model.optim.optimizer == "muon" and model.optim.lr == 0.02
    assert model.optim.optimizer_kwargs["adam_lr"] == 0.01 and model.optim.warmup_steps == 50


def test_data_block_size_sets_the_models():
    model = cli_model("--config", str(RECIPES / "muon_lm.yaml"), "--data.block_size", "24")
    assert model.hparams.block_size == 24
