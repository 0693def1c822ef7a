"""Exact resume: 2N steps straight == N steps, stop, resume from last.ckpt, N more steps."""
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from toolkit import Classifier, ImageDataModule, LanguageModel, TextDataModule
from toolkit.cli import trainer


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def fit(make_model, make_data, root, total, every, stop_at=None, ckpt_path=None):
    L.seed_everything(0)
    model, dm = make_model(), make_data()
    cbs = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_last=True, save_top_k=-1)]
    if stop_at:
        cbs.append(StopAt(stop_at))
    t = trainer(max_steps=total, callbacks=cbs, logger=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                default_root_dir=root)
    t.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert t.global_step == (stop_at or total)
    return model.state_dict()


def straight_and_resumed(make_model, make_data, root, total, stop_at):
    """Final weights of a straight run, and of one stopped at ``stop_at`` and resumed from
    its ``last.ckpt`` up to the same budget."""
    straight = fit(make_model, make_data, root / "a", total=total, every=stop_at)
    fit(make_model, make_data, root / "b", total=total, every=stop_at, stop_at=stop_at)
    resumed = fit(make_model, make_data, root / "c", total=total, every=100,
                  ckpt_path=root / "b" / "last.ckpt")
    return straight, resumed


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"


def test_lm_resume_is_bitwise(tmp_path):
    make_model = lambda: LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32,
                                       dropout=0.1, lr=3e-3, warmup_steps=2)
    make_data = lambda: TextDataModule(block_size=16, batch_size=8)
    assert_bitwise(*straight_and_resumed(make_model, make_data, tmp_path, total=12, stop_at=6))


@pytest.mark.parametrize("stop_at", [7, 10])  # mid-epoch, and exactly at the epoch boundary
def test_image_resume_mid_epoch_is_bitwise(tmp_path, tiny_mnist, stop_at):
    # 500 training examples / batch 50 = 10 batches an epoch; 16 steps cross one boundary.
    make_model = lambda: Classifier(arch="cnn", width=4, norm="group", lr=3e-3, warmup_steps=2)
    make_data = lambda: ImageDataModule(root=str(tiny_mnist), val_size=100, batch_size=50)
    assert_bitwise(*straight_and_resumed(make_model, make_data, tmp_path, total=16,
                                         stop_at=stop_at))
