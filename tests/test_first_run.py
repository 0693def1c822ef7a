"""First-run polish: progress from step 1 with ETA, --print_config shows the applied logger
and callbacks, the thread check, no "not resumable" warning on an exact mid-epoch resume."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from toolkit import Classifier, ImageDataModule
from toolkit.callbacks import PlainProgress
from toolkit.cli import RECIPES, main, trainer
from toolkit.runtime import thread_warning


def test_thread_warning_only_when_threads_outnumber_free_cores():
    assert thread_warning(threads=2, cores=2, load=0.1) is None
    assert thread_warning(threads=1, cores=2, load=1.9) is None
    msg = thread_warning(threads=2, cores=2, load=1.2)  # another process holds one core
    assert "only ~1 of the 2 cores are free" in msg and "OMP_NUM_THREADS=1" in msg
    assert "OMP_NUM_THREADS=3" in thread_warning(threads=8, cores=4, load=1.0)


def _fit_classifier(root, mnist, steps, callbacks, ckpt_path=None, progress=False):
    torch.manual_seed(0)
    t = trainer(max_steps=steps, logger=False, enable_model_summary=False, limit_val_batches=0,
                num_sanity_val_steps=0, enable_progress_bar=progress, callbacks=callbacks)
    t.fit(Classifier(arch="cnn", width=4, norm="group", lr=3e-3),
          datamodule=ImageDataModule(root=str(mnist), val_size=100, batch_size=50), ckpt_path=ckpt_path)
    return t


def test_plain_progress_prints_at_step_one_then_every_n_with_eta(capsys, tmp_path, tiny_mnist):
    _fit_classifier(tmp_path, tiny_mnist, 7, [PlainProgress(every=3)], progress=True)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[")]
    steps = [int(re.search(r"step (\d+)/7", l).group(1)) for l in lines]
    assert steps == [1, 3, 6]
    assert all(re.search(r"eta \d+m\d\ds", l) for l in lines)


def test_mid_epoch_resume_does_not_warn_about_the_loader(tmp_path, tiny_mnist):
    ck = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_last=True)
    _fit_classifier(tmp_path, tiny_mnist, 3, [ck])  # 10 batches an epoch: stops mid-epoch
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit_classifier(tmp_path, tiny_mnist, 5, [ModelCheckpoint(dirpath=tmp_path / "b")],
                        ckpt_path=tmp_path / "last.ckpt")
    assert not [w for w in seen if "not resumable" in str(w.message)]


def test_print_config_shows_the_applied_logger_and_callbacks(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(RECIPES / "kmixup_mnist.yaml"), "--print_config"])
    assert e.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert cfg["logger"]["class_path"].endswith("TensorBoardLogger")
    assert cfg["logger"]["init_args"]["name"] == "kmixup_mnist"
    names = [c["class_path"].rsplit(".", 1)[1] for c in cfg["callbacks"]]
    assert names == ["KMixup", "ModelCheckpoint", "LearningRateMonitor", "RNGState", "FiniteGuard",
                     "PlainProgress"]
