"""The reliability contract over the registries (after Composer's test_algorithm_resumption):
exact resume for every optimizer and callback, a SIGKILL between checkpoints resumed with
--ckpt_path last equals the straight run bitwise, a SIGKILL during a checkpoint write never
leaves an unloadable last.ckpt, every pair of plug-ins composes or is refused at fit start,
and an exception inside fit leaves the module as it was. The plug-ins are discovered
(tests/contract_plugins.py); each must also be named in a recipe with a results file and in a
docs page, or say why not."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import optimizers
from tests.contract_plugins import (CALLBACKS, FRESH_ON_RESUME, NO_RECIPE, NOT_IN_CONTRACT,
                                    REFUSED, callback,
                                    contract_callbacks, contract_optimizers,
                                    pairs, plugin_names, undeclared_needs_arguments)
from tests.test_resume import assert_bitwise, straight_and_resumed
from toolkit import Classifier, ImageDataModule, LanguageModel, TextDataModule
from toolkit.cli import trainer

ROOT = Path(__file__).resolve().parent.parent


def _image(tiny_mnist, optimizer="adamw"):
    return (lambda: Classifier(arch="cnn", width=4, norm="group", optimizer=optimizer, warmup_steps=2),
            lambda: ImageDataModule(root=str(tiny_mnist), val_size=100, batch_size=50))


def _lm(optimizer="adamw"):
    return (lambda: LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16,
                                  dropout=0.1, optimizer=optimizer, warmup_steps=2),
            lambda: TextDataModule(block_size=16, batch_size=8))


# ---- discovery: every plug-in takes part, or says why, and is documented ------------------
def test_every_plugin_takes_part_or_says_why():
    # an optimizer that does not train a model's parameters cannot run the contract
    assert set(contract_optimizers()) == set(optimizers.model_optimizers()), \
        "declare why in tests/contract_plugins.py NOT_IN_CONTRACT"
    stale = (set(CALLBACKS) | set(NOT_IN_CONTRACT) | set(NO_RECIPE) | set(FRESH_ON_RESUME)) \
        - set(plugin_names())
    assert not stale, f"entries for plug-ins that no longer exist: {sorted(stale)}"
    assert not set(NOT_IN_CONTRACT) & set(contract_callbacks() + contract_optimizers())
    # one that needs constructor arguments says how to build it
    needs = [why for n in contract_callbacks() if (why := undeclared_needs_arguments(n))]
    assert not needs, "\n".join(needs)


def _mentions(text: str, name: str) -> bool:
    # a class path (regularizers.KMixup), an optimizer key or a word in the header comment
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


@pytest.mark.parametrize("name", plugin_names())
def test_every_plugin_has_a_recipe_with_results_and_a_docs_page(name):
    recipes = [p for p in sorted((ROOT / "recipes").glob("*.yaml")) if _mentions(p.read_text(), name)]
    if name not in NO_RECIPE:
        assert recipes, (f"no recipe names {name}: add recipes/<paper>.yaml using it, or say why "
                         "in tests/contract_plugins.py NO_RECIPE (docs/contributing.md)")
    for r in recipes:
        assert (ROOT / "docs/results" / f"{r.stem}.json").is_file(), \
            f"recipe {r.stem} (uses {name}) has no docs/results/{r.stem}.json: python -m scripts.results"
    pages = [p for p in sorted((ROOT / "docs").rglob("*.md")) if _mentions(p.read_text(), name)]
    assert pages, f"no page under docs/ names {name}: describe it in its area's page"


# ---- exact resume, every optimizer and every callback -----------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", contract_optimizers())
def test_every_optimizer_resumes_bitwise_mid_epoch(name, tmp_path, tiny_mnist):
    make_model, make_data = _image(tiny_mnist, name)  # its registered default lr
    assert_bitwise(*straight_and_resumed(make_model, make_data, tmp_path, total=8, stop_at=5))


@pytest.mark.slow
@pytest.mark.parametrize("name", contract_callbacks())
def test_every_callback_resumes_bitwise_mid_epoch(name, tmp_path, tiny_mnist, monkeypatch):
    factory, kinds = callback(name)
    make_model, make_data = _image(tiny_mnist) if "image" in kinds else _lm()
    import tests.test_resume as resume
    base = resume.trainer
    monkeypatch.setattr(resume, "trainer",
                        lambda **kw: base(**{**kw, "callbacks": kw["callbacks"] + [factory()]}))
    straight, resumed = straight_and_resumed(make_model, make_data, tmp_path, total=8, stop_at=5)
    if name in FRESH_ON_RESUME:
        assert straight.keys() == resumed.keys()
        assert any(not torch.equal(straight[k], resumed[k]) for k in straight), \
            f"{name} replayed its draws on resume: {FRESH_ON_RESUME[name]}"
        return
    assert_bitwise(straight, resumed)


# ---- SIGKILL ------------------------------------------------------------------------------
def _cli(*extra):
    return [sys.executable, "-m", "toolkit", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
            "--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2",
            "--model.dropout", "0.1", "--data.batch_size", "4", "--trainer.max_steps", "40",
            "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "1", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_last_is_bitwise(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for d in (straight, killed):
        d.mkdir()
    subprocess.run(_cli(), cwd=straight, env=_env(), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(), cwd=killed, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "runs/quickstart/version_0/checkpoints/last.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            if _step(last) >= 10:
                break
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 10 <= _step(last) < 40
    resumed = subprocess.run(_cli("--ckpt_path", "last"), cwd=killed, env=_env(), check=True,
                             capture_output=True, text=True)
    a = torch.load(straight / "runs/quickstart/version_0/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    assert_bitwise(a["state_dict"], b["state_dict"])
    # a resume prints none of the noise a first run used to show
    for noise in ("LeafSpec", "litlogger", "exists and is not empty", "not resumable"):
        assert noise not in resumed.stderr + resumed.stdout, noise


WRITER = """
import sys, torch
from toolkit.checkpoint_io import atomic_save
path = sys.argv[1]
big = torch.randn(24_000_000)  # ~96 MB: a write takes long enough to be cut
for i in range(1000):
    obj = {{"i": i, "w": big}}
    atomic_save(obj, path)
    open(path + ".done", "w").write(str(i))
"""


def _kill_mid_write(tmp_path: Path) -> tuple[Path, bool]:
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(), str(target)],
                            env=_env(), stderr=subprocess.DEVNULL)
    done, deadline = Path(str(target) + ".done"), time.time() + 60
    while not done.exists() and time.time() < deadline:  # one complete checkpoint first
        time.sleep(0.01)
    size_done = target.stat().st_size
    while time.time() < deadline:  # then kill inside the next write
        try:
            tmps = list(tmp_path.glob(".last.ckpt.tmp-*"))
            partial = bool(tmps) and 0 < tmps[0].stat().st_size < size_done
        except FileNotFoundError:  # renamed between glob and stat: that write completed
            partial = False
        if partial:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return target, bool(partial)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_last(tmp_path):
    target, cut = _kill_mid_write(tmp_path)
    assert cut, "the kill did not land inside a write"
    assert torch.load(target, weights_only=True)["i"] >= 0  # the previous, whole checkpoint


def test_default_trainer_writes_checkpoints_atomically(tmp_path):
    from toolkit.checkpoint_io import AtomicCheckpointIO
    t = trainer(max_steps=1, logger=False)
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- composition and restoration ------------------------------------------------------------
def _hook_counts(model: torch.nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()]


class _Boom(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("boom at step 3")


def _short_fit(kind, callbacks, tiny_mnist, steps=4):
    make_model, make_data = _image(tiny_mnist) if kind == "image" else _lm()
    torch.manual_seed(0)
    model = make_model()
    t = trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                callbacks=callbacks)
    t.fit(model, datamodule=make_data())
    return model, t, _hook_counts(model)


@pytest.mark.parametrize("a,b,kind", pairs(), ids=lambda v: v if isinstance(v, str) else None)
def test_every_pair_composes_or_is_refused_at_fit_start(a, b, kind, tiny_mnist):
    refused = REFUSED.get(frozenset({a, b}))
    cbs = [callback(a)[0](), callback(b)[0]()]
    if refused:
        with pytest.raises(ValueError, match=refused):
            _short_fit(kind, cbs, tiny_mnist)
        return
    model, t, hooks = _short_fit(kind, cbs, tiny_mnist)
    assert t.global_step == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert "training_step" not in vars(model) and not any(hooks)


@pytest.mark.parametrize("name", contract_callbacks())
def test_an_exception_inside_fit_leaves_the_module_restored(name, tiny_mnist):
    kind = "image" if "image" in callback(name)[1] else "lm"
    make_model, make_data = _image(tiny_mnist) if kind == "image" else _lm()
    model = make_model()
    before = _hook_counts(model)
    t = trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                callbacks=[callback(name)[0](), _Boom()])
    with pytest.raises(RuntimeError, match="boom at step 3"):
        t.fit(model, datamodule=make_data())
    assert t.global_step == 3  # it did train, with the plug-in active, before the exception
    assert "training_step" not in vars(model)
    assert _hook_counts(model) == before
