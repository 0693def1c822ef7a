"""The default trainer stops at the first non-finite loss or gradient before the optimizer
applies it, names the step, and leaves the last good checkpoint as last.ckpt."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from toolkit.callbacks import NonFiniteError
from toolkit.cli import trainer


class Breaks(L.LightningModule):
    """Trains normally, except at optimizer step ``bad_step``: a NaN loss or an inf gradient."""

    def __init__(self, bad_step: int | None = None, what: str = "loss"):
        super().__init__()
        self.net = torch.nn.Linear(6, 3)
        self.bad_step, self.what = bad_step, what

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.global_step == self.bad_step:
            if self.what == "loss":
                loss = loss * float("nan")
            else:  # a finite loss whose gradient overflows
                self.net.weight.register_hook(lambda g: g * float("inf"))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _fit(model, root, steps):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(80, 6, generator=g), torch.randint(0, 3, (80,), generator=g))
    t = trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True)])
    t.fit(model, DataLoader(data, batch_size=8))
    return t


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_nonfinite_step_is_not_applied_and_stops_naming_the_step(tmp_path, what):
    torch.manual_seed(1)
    model = Breaks(bad_step=4, what=what)
    good = Breaks()
    good.load_state_dict(model.state_dict())
    with pytest.raises(NonFiniteError, match=r"step 4 \(epoch 0, batch 4\).*not applied") as e:
        _fit(model, tmp_path / "bad", steps=10)
    assert ("loss is [nan]" if what == "loss" else "gradient of ['net.weight']") in str(e.value)
    assert str(tmp_path / "bad" / "last.ckpt") in str(e.value)
    _fit(good, tmp_path / "good", steps=4)  # the same first 4 steps, nothing after
    for a, b in zip(model.state_dict().values(), good.state_dict().values()):
        assert torch.equal(a, b)  # the bad update never reached the weights
    ckpt = torch.load(tmp_path / "bad" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    for k, v in good.state_dict().items():
        assert torch.equal(ckpt["state_dict"][k], v)


def test_finite_training_is_untouched(tmp_path):
    t = _fit(Breaks(), tmp_path, steps=5)
    assert t.global_step == 5
