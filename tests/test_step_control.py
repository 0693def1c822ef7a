"""RadiusControl (Ghosts of Softmax step controller) and LRSpike inside a real Lightning fit,
checked step by step against an independent recomputation: the proposed SGD step from
autograd at the pre-step weights, rho_a from finite differences of the logits, and the
applied step expected to be the proposed one times min(1, r_max * rho_a / tau)."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regularizers import LRSpike, RadiusControl

LR, SPIKE_AT, FACTOR, R_MAX = 0.5, 2, 1e3, 0.5


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class _Recorder(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append({"batch": [t.clone() for t in batch],
                          "before": {n: p.detach().clone() for n, p in pl_module.named_parameters()}})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows[-1]["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        self.rows[-1]["logged_r"] = float(trainer.callback_metrics["ghosts/r"])


def _fit(callbacks, steps=6):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (96,), generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    model = _Tiny()
    L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, precision="64-true", callbacks=callbacks,
              accelerator="cpu").fit(model, loader)
    return model


def _expected_step(row, lr, r_max=R_MAX):
    """Independent: proposed SGD step, rho_a by central finite differences, the scaled step."""
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    net.load_state_dict({k.removeprefix("net."): v for k, v in row["before"].items()})
    x, y = row["batch"]
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    step = [-lr * g for g in grads]
    tau = math.sqrt(sum(float(s.pow(2).sum()) for s in step))
    eps = 1e-6
    with torch.no_grad():
        base = [p.clone() for p in net.parameters()]
        outs = []
        for sign in (1, -1):
            for p, b, s in zip(net.parameters(), base, step):
                p.copy_(b + sign * eps * s / tau)
            outs.append(net(x))
        a = (outs[0] - outs[1]) / (2 * eps)
    rho = math.pi / float((a.max(1).values - a.min(1).values).max())
    r = tau / rho
    return [min(1.0, r_max / r) * s for s in step], r


def test_each_applied_step_is_the_proposed_step_scaled_into_the_radius():
    rec = _Recorder()
    ctrl = RadiusControl(r_max=R_MAX)
    model = _fit([LRSpike(start=SPIKE_AT, length=1, factor=FACTOR), ctrl, rec])
    rs = []
    for t, row in enumerate(rec.rows):
        lr = LR * (FACTOR if t == SPIKE_AT else 1.0)
        expected, r = _expected_step(row, lr)
        applied = [row["after"][n] - row["before"][n] for n in row["before"]]
        for got, want in zip(applied, expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        assert row["logged_r"] == pytest.approx(r, rel=1e-6)
        rs.append(r)
    # the spike step is far outside the radius and is scaled; the plain steps are not
    assert rs[SPIKE_AT] > 10 * R_MAX and all(r < R_MAX for i, r in enumerate(rs) if i != SPIKE_AT)
    assert ctrl.scaled == 1 and ctrl.steps == len(rec.rows)
    assert model.optimizers().optimizer.param_groups[0]["lr"] == LR  # the spike is undone


def test_without_control_the_spike_step_is_applied_in_full():
    rec = _Recorder()
    _fit([LRSpike(start=SPIKE_AT, length=1, factor=FACTOR), RadiusControl(r_max=math.inf), rec])
    row = rec.rows[SPIKE_AT]
    expected, r = _expected_step(row, LR * FACTOR, r_max=math.inf)
    assert r > 10
    for n, want in zip(row["before"], expected):
        torch.testing.assert_close(row["after"][n] - row["before"][n], want, rtol=1e-6, atol=1e-9)


def test_state_dict_round_trip_and_bad_arguments():
    ctrl = RadiusControl(r_max=0.7)
    ctrl.steps, ctrl.scaled, ctrl.last = 5, 2, {"r": 3.0}
    other = RadiusControl(r_max=0.7)
    other.load_state_dict(ctrl.state_dict())
    assert (other.steps, other.scaled, other.last) == (5, 2, {"r": 3.0})
    spike = LRSpike(start=1, length=2, factor=10.0)
    spike.steps = 4
    again = LRSpike(start=1, length=2, factor=10.0)
    again.load_state_dict(spike.state_dict())
    assert again.steps == 4 and not again.active()
    for bad in (0.0, -1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="r_max"):
            RadiusControl(r_max=bad)
    with pytest.raises(ValueError, match="max_examples"):
        RadiusControl(max_examples=0)
    with pytest.raises(ValueError, match="factor"):
        LRSpike(start=0, factor=0.0)
    with pytest.raises(ValueError, match="length"):
        LRSpike(start=0, length=0)
