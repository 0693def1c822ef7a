"""LangevinNoise: noise scale sqrt(2 lr T) per param group, reproducibility, resume, averaging."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from regularizers import IterateAveraging, LangevinNoise, add_langevin_noise_


class ZeroGrad(L.LightningModule):
    """Loss 0 * sum(params): every gradient is exactly zero, so plain SGD leaves the weights
    where they are and any change is the Langevin noise alone."""

    def __init__(self, lrs=(0.1, 0.02), n=20000, schedule=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(n))
        self.b = torch.nn.Parameter(torch.zeros(n // 2, 2))
        self.lrs, self.schedule, self.iterates = lrs, schedule, []

    def training_step(self, batch, batch_idx):
        return 0.0 * (self.a.sum() + self.b.sum() + batch[0].sum())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.iterates.append(self.a.detach().clone())

    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": [self.a], "lr": self.lrs[0]},
                               {"params": [self.b], "lr": self.lrs[1]}])
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader():
    return DataLoader(TensorDataset(torch.zeros(64, 1)), batch_size=8)


def _fit(model, cbs, steps, ckpt=None, root=None):
    tr = L.Trainer(max_steps=steps, callbacks=cbs, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, default_root_dir=root)
    tr.fit(model, _loader(), ckpt_path=ckpt)
    return tr


@pytest.mark.parametrize("T", [1e-2, 3e-4])
def test_noise_std_is_sqrt_2_lr_T_per_group(T):
    model = ZeroGrad()
    _fit(model, [LangevinNoise(temperature=T, seed=0)], steps=1)
    for p, lr in ((model.a, 0.1), (model.b, 0.02)):
        want = math.sqrt(2 * lr * T)
        assert abs(p.detach().std().item() / want - 1) < 0.03  # 20000 draws: ~0.5% s.e.
        assert abs(p.detach().mean().item()) < 4 * want / math.sqrt(p.numel())


def test_noise_uses_the_lr_of_each_step_under_a_schedule():
    """lr_t = 0.1 / (1 + t): after 4 steps the variance is 2 T sum_t lr_t (independent draws)."""
    T = 1e-2
    model = ZeroGrad(schedule=True)
    _fit(model, [LangevinNoise(temperature=T, seed=0)], steps=4)
    want = math.sqrt(2 * T * sum(0.1 / (1 + t) for t in range(4)))
    assert abs(model.a.detach().std().item() / want - 1) < 0.03
    # the lr after the last step (0.1 / 5) would give a visibly different answer
    assert abs(math.sqrt(2 * T * 4 * 0.1 / 5) / want - 1) > 0.3


def test_functional_core_matches_formula():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.5)
    add_langevin_noise_(opt.param_groups, 0.1, torch.Generator().manual_seed(3))
    xi = torch.randn(10, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(p.detach(), math.sqrt(2 * 0.5 * 0.1) * xi)
    with pytest.raises(ValueError, match="temperature"):
        LangevinNoise(temperature=-1.0)


def test_reproducible_and_resumes_from_checkpoint(tmp_path):
    straight = ZeroGrad(n=200)
    _fit(straight, [LangevinNoise(temperature=1e-3, seed=5)], steps=6)
    again = ZeroGrad(n=200)
    _fit(again, [LangevinNoise(temperature=1e-3, seed=5)], steps=6)
    assert torch.equal(straight.a, again.a)
    other = ZeroGrad(n=200)
    _fit(other, [LangevinNoise(temperature=1e-3, seed=6)], steps=6)
    assert not torch.allclose(straight.a, other.a)

    first = ZeroGrad(n=200)
    tr = _fit(first, [LangevinNoise(temperature=1e-3, seed=5)], steps=3, root=tmp_path)
    tr.save_checkpoint(tmp_path / "mid.ckpt")
    cb = LangevinNoise(temperature=1e-3, seed=5)
    resumed = ZeroGrad(n=200)
    _fit(resumed, [cb], steps=6, ckpt=str(tmp_path / "mid.ckpt"), root=tmp_path)
    assert cb.steps == 6
    assert torch.equal(resumed.a, straight.a) and torch.equal(resumed.b, straight.b)


def test_iterate_averaging_is_the_mean_of_noisy_iterates():
    model = ZeroGrad(n=500)
    _fit(model, [LangevinNoise(temperature=1e-2, seed=0), IterateAveraging(start_step=2)], steps=8)
    # at fit end WeightAveraging copies the average of iterates 2..7 (after steps 3..8) in
    want = torch.stack(model.iterates[2:]).mean(0)
    assert torch.allclose(model.a.detach(), want, atol=1e-6)
    assert model.a.detach().std() < 0.8 * model.iterates[-1].std()
