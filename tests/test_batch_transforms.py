"""Batch-transforming callbacks share one training_step wrapper: they compose in callback
order, two example-mixers are refused at fit start, and the module is restored exactly
after fit, after a refusal and after an exception."""
from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from regularizers import BatchTransform, KMixup, Mixup
from regularizers.batch_transforms import transforms_of
from regularizers.dp.validate import PrivacyError, check_callbacks


class Plain(L.LightningModule):
    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = torch.nn.Linear(8, 4)
        self.fail_at, self.seen = fail_at, []

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("boom inside training_step")
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Scale(BatchTransform):
    """A non-mixing transform: multiplies the inputs by ``factor`` (records what it saw)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor, self.inputs = factor, []

    def transform_batch(self, batch, pl_module):
        x, y = batch
        self.inputs.append(x.clone())
        return x * self.factor, y


def _loader(n=64):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=16)


def _fit(model, callbacks, steps=3):
    L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(model, _loader())


def test_two_mixers_are_refused_at_fit_start_and_the_module_is_untouched():
    model = Plain()
    with pytest.raises(ValueError, match=r"\['KMixup', 'Mixup'\] both mix examples.*Keep one"):
        _fit(model, [KMixup(k=4, num_classes=4), Mixup(num_classes=4)])
    assert model.seen == [] and model.global_step == 0  # refused before any step
    assert "training_step" not in vars(model) and transforms_of(model) == []


def test_transforms_compose_in_callback_order_and_unwind():
    model, first, second = Plain(), Scale(2.0), Scale(3.0)
    _fit(model, [first, second], steps=3)
    for a, b, (seen, _) in zip(first.inputs, second.inputs, model.seen):
        assert torch.equal(b, a * 2.0) and torch.equal(seen, a * 6.0)
    assert len(model.seen) == 3 and "training_step" not in vars(model)


def test_mixer_composes_with_a_non_mixing_transform():
    model, scale = Plain(), Scale(0.5)
    mix = KMixup(k=4, alpha=1.0, num_classes=4, seed=0)
    _fit(model, [mix, scale], steps=2)
    assert mix.batches_mixed == 2 and len(scale.inputs) == 2
    for (x_seen, y_seen), x_in in zip(model.seen, scale.inputs):
        assert y_seen.is_floating_point()  # mixed (soft) targets reach the module
        assert torch.equal(x_seen, x_in * 0.5)
    assert "training_step" not in vars(model)


@pytest.mark.parametrize("callbacks", [lambda: [KMixup(k=4, num_classes=4)],
                                       lambda: [Scale(2.0), Mixup(num_classes=4)]])
def test_exception_inside_fit_restores_the_module(callbacks):
    model = Plain(fail_at=1)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(model, callbacks())
    assert "training_step" not in vars(model) and transforms_of(model) == []
    # and the module trains normally afterwards, unmixed
    model.fail_at = None
    _fit(model, [], steps=1)
    assert not model.seen[-1][1].is_floating_point()


def test_a_training_step_patched_on_the_instance_is_put_back_exactly():
    model = Plain()
    own = model.training_step  # e.g. a user's own wrapper set on the instance
    model.training_step = lambda batch, batch_idx: own(batch, batch_idx)
    patched = vars(model)["training_step"]
    _fit(model, [Mixup(num_classes=4), Scale(1.0)], steps=2)
    assert vars(model)["training_step"] is patched and len(model.seen) == 2


def test_dpsgd_still_refuses_a_mixing_callback():
    assert KMixup.mixes_batch and Mixup.mixes_batch and not Scale.mixes_batch
    with pytest.raises(PrivacyError, match="mix examples"):
        check_callbacks([Mixup(num_classes=4)])
