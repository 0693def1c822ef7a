"""The CLI: every recipe parses and runs, defaults are present, recipes listed, resume."""
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from toolkit.cli import RECIPES, list_recipes, main

ROOT = Path(__file__).resolve().parent.parent
ALL = sorted(RECIPES.glob("*.yaml"))


@pytest.fixture(scope="module")
def recipe_mnist(tmp_path_factory) -> Path:
    """MNIST-format stand-in: the recipes must run on any MNIST-format folder, and two steps
    need no real digits."""
    from tests.helpers import write_fake_mnist
    return write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=1200, n_test=100)


def data_overrides(recipe: Path, mnist: Path) -> list[str]:
    data = yaml.safe_load(recipe.read_text()).get("data", {})
    args = data.get("init_args", {})
    module, _, name = data.get("class_path", "").rpartition(".")
    takes = inspect.signature(getattr(importlib.import_module(module), name)).parameters if module else {}
    out = ["--data.root", str(mnist)] if "root" in args else []
    if "root" in args and "val_size" in takes:
        out += ["--data.val_size", "100"]
    if args.get("train_subset"):
        out += ["--data.train_subset", "500"]
    if args.get("batch_size", 0) > 500:
        out += ["--data.batch_size", "100"]
    return out


@pytest.mark.parametrize("recipe", ALL, ids=lambda p: p.stem)
def test_recipe_prints_config(recipe, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] and cfg["data"]["class_path"]


@pytest.fixture(scope="module")
def tiny_lm_checkpoint(tmp_path_factory) -> Path:
    from tests.helpers import write_tiny_lm_checkpoint
    return write_tiny_lm_checkpoint(tmp_path_factory.mktemp("lm") / "tiny.ckpt")


def model_overrides(recipe: Path, lm_checkpoint: Path) -> list[str]:
    """Recipes that start from a trained LM (BitWidthSearch) get a tiny stand-in checkpoint."""
    args = yaml.safe_load(recipe.read_text()).get("model", {}).get("init_args", {})
    return ["--model.checkpoint", str(lm_checkpoint)] if "checkpoint" in args else []


# those whose two steps take several seconds (ScatterNet features, a pretrained MiniLM, sigma
# calibrated for the planned steps by the RDP/PRV accountants)
SLOW_TWO_STEPS = {"dp_lm", "dpsgd_mnist", "minilm_speakers"}


@pytest.mark.parametrize("recipe", [pytest.param(p, marks=pytest.mark.slow)
                                    if p.stem in SLOW_TWO_STEPS else p for p in ALL],
                         ids=lambda p: p.stem)
def test_recipe_runs_two_steps(recipe, recipe_mnist, tiny_lm_checkpoint):
    main(["fit", "--config", str(recipe), "--trainer.fast_dev_run", "2",
          *data_overrides(recipe, recipe_mnist), *model_overrides(recipe, tiny_lm_checkpoint)])


def test_recipe_headers_are_listed():
    out = list_recipes()
    for recipe in ALL:
        line = next(l for l in out.splitlines() if l.split()[0] == recipe.stem)
        assert len(line.split(None, 1)[1]) > 20, f"{recipe.name} lacks a header comment"


@pytest.mark.slow  # a second Python process importing the whole stack
def test_the_console_command_lists_recipes():
    run = subprocess.run([sys.executable, "-m", "toolkit", "recipes"], capture_output=True,
                         text=True, cwd=ROOT, check=True)
    assert "quickstart" in run.stdout


def test_defaults_logs_checkpoint_config_and_resume_last(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    quick = ["fit", "--config", str(RECIPES / "quickstart.yaml"), "--model.n_layer", "1",
             "--model.n_embd", "16", "--model.n_head", "2", "--data.batch_size", "4",
             "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1"]
    main(quick + ["--trainer.max_steps", "3", "--trainer.callbacks+=EarlyStopping",
                  "--trainer.callbacks.monitor=train/loss", "--trainer.callbacks.patience=100"])
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (run / "config.yaml").is_file(), "resolved config not saved"
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 3
    # a recipe/command-line callback is added next to the defaults, not instead of them
    assert {"RNGState", "EarlyStopping", "ModelCheckpoint"} <= {k.split("{")[0] for k in ckpt["callbacks"]}
    # Resume: continues the same run folder up to the new budget.
    main(quick + ["--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert torch.load(last, weights_only=True)["global_step"] == 6
    assert not (tmp_path / "runs" / "quickstart" / "version_1").exists()
    main(["validate"] + quick[1:] + ["--ckpt_path", "last"])


def test_recipe_callbacks_keep_the_defaults(monkeypatch, tmp_path):
    from lightning.pytorch.callbacks import (EarlyStopping, LearningRateMonitor, ModelCheckpoint,
                                             ProgressBar)
    from toolkit.cli import default_callbacks
    cbs = default_callbacks({}, [EarlyStopping(monitor="val/loss")])
    for t in (EarlyStopping, LearningRateMonitor, ModelCheckpoint, ProgressBar):
        assert sum(isinstance(c, t) for c in cbs) == 1
    own = ModelCheckpoint(monitor="val/loss")
    assert [c for c in default_callbacks({}, [own]) if isinstance(c, ModelCheckpoint)] == [own]


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_last_without_a_checkpoint_fails_clearly(subcommand, capsys, tmp_path,
                                                            recipe_mnist):
    """Nothing to load: a clear error and exit status 2, not an untrained model's metrics, and
    no version folder taken."""
    recipe = RECIPES / "mnist_cnn.yaml"
    with pytest.raises(SystemExit) as e:
        main([subcommand, "--config", str(recipe), "--ckpt_path", "last",
              *data_overrides(recipe, recipe_mnist)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{subcommand} --ckpt_path last: no last.ckpt under runs/mnist_cnn" in err
    assert "Train first" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recipe_name,options,says", [
    ("muon_lm.yaml", "{ns_step: 3}", r"'muon' has no option(s) ['ns_step']; it accepts ['adam_lr', "),
    ("auon_lm.yaml", "{ns_steps: 3}", "'auon' does not use 'ns_steps'"),
])
def test_an_optimizer_option_typo_fails_at_parse_time(recipe_name, options, says, capsys, tmp_path,
                                                      monkeypatch):
    """Before any class is built or a run folder made, naming the accepted options."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(RECIPES / recipe_name), "--model.init_args.optimizer_kwargs",
              options])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "toolkit: error: model.init_args: optimizer" in err and says in err
    assert not (tmp_path / "runs").exists()
