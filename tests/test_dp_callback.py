"""The DPSGD callback on an unmodified LightningModule: training, refusals, ledger, resume."""
import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from regularizers import DPSGD, KMixup, Mixup
from regularizers.dp import PrivacyError, epsilon
from toolkit import Classifier, ImageDataModule


warnings.filterwarnings("ignore", message="DPSGD.seed")


def data(root, batch_size=50, **kw):
    return ImageDataModule(root=str(root), batch_size=batch_size, val_size=100, seed=0, **kw)


def model(**kw):
    kw = {"arch": "tanh_cnn", "optimizer": "sgd", "lr": 0.5, "lr_decay": "constant", **kw}
    return Classifier(**kw)


def trainer(callbacks, **kw):
    kw = {"max_epochs": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False,
          "limit_val_batches": 1, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(callbacks=callbacks, **kw)


def test_trains_an_unaware_module_and_reports(tiny_mnist):
    torch.manual_seed(0)
    dp = DPSGD(noise_multiplier=0.8, delta=1e-4, max_grad_norm=1.0, accountant="rdp", seed=1)
    m = model()
    t = trainer([dp], max_epochs=3)
    t.fit(m, data(tiny_mnist))
    r = dp.report
    steps_per_epoch = round(500 / 50)
    assert r["steps"] == r["accounted_steps"] == 3 * steps_per_epoch == t.global_step
    assert r["sample_rate"] == pytest.approx(50 / 500) and r["noise_multiplier"] == 0.8
    assert r["epsilon"] == pytest.approx(epsilon([(0.8, 0.1, 30)], 1e-4, "rdp"))
    assert t.callback_metrics["dp/epsilon"].item() == pytest.approx(r["epsilon"], rel=1e-6)
    assert "Poisson" in r["analysis"] and r["accountant"] == "rdp"
    # batches were Poisson: sizes vary around q N
    assert t.callback_metrics["val/acc"].item() > 0.5  # fake digits are separable


def test_step_is_the_functional_mechanism(tiny_mnist):
    """One callback step writes exactly privatize_'s gradient (same batch, same noise)."""
    from regularizers.dp import PerSampleGradients, privatize_
    from regularizers.dp.sampling import step_generator
    seen = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["batch"] = [t.clone() for t in batch]
            seen["params"] = [p.detach().clone() for p in pl_module.parameters()]

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen["grads"] = [p.grad.clone() for p in pl_module.parameters()]

    torch.manual_seed(0)
    dp = DPSGD(noise_multiplier=1.1, delta=1e-4, max_grad_norm=0.5, seed=5)
    m = model()
    trainer([dp, Spy()], max_steps=1).fit(m, data(tiny_mnist))
    ref = model()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), seen["params"]):
            p.copy_(q)
    eng = PerSampleGradients(ref)
    with eng.capture():
        x, y = seen["batch"]
        torch.nn.functional.cross_entropy(ref(x), y).backward()
    privatize_(eng, 0.5, 1.1, 50.0, generator=step_generator(dp._noise_seed, 0, stream=1))
    for g, p in zip(seen["grads"], ref.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_stops_before_exceeding_target_epsilon(tiny_mnist):
    dp = DPSGD(noise_multiplier=1.0, target_epsilon=3.0, delta=1e-4, accountant="rdp", seed=0)
    t = trainer([dp], max_epochs=50)
    t.fit(model(), data(tiny_mnist))
    n = dp.report["accounted_steps"]
    assert 0 < n == t.global_step < 500
    assert dp.report["epsilon"] <= 3.0 < epsilon([(1.0, 0.1, n + 1)], 1e-4, "rdp")
    # a budget too small for one step trains nothing
    dp = DPSGD(noise_multiplier=0.6, target_epsilon=2.0, delta=1e-4, accountant="rdp", seed=0)
    t = trainer([dp], max_epochs=1)
    t.fit(model(), data(tiny_mnist))
    assert t.global_step == 0 and dp.report["epsilon"] == 0.0


@pytest.mark.slow  # trains 20 steps after an accountant calibration
def test_target_epsilon_calibrates_sigma_for_the_planned_steps(tiny_mnist):
    dp = DPSGD(target_epsilon=4.0, delta=1e-4, accountant="rdp", seed=0)
    t = trainer([dp], max_epochs=2)
    t.fit(model(), data(tiny_mnist))
    assert dp.report["accounted_steps"] == 20
    assert 3.9 <= dp.report["epsilon"] <= 4.0


def test_resume_continues_the_ledger(tiny_mnist, tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    dp = DPSGD(noise_multiplier=1.0, delta=1e-4, accountant="rdp", seed=0)
    trainer([dp, ckpt], max_epochs=1, enable_checkpointing=True).fit(model(), data(tiny_mnist))
    assert dp.ledger == [[1.0, 0.1, 10]]
    dp2 = DPSGD(noise_multiplier=1.0, delta=1e-4, accountant="rdp", seed=0)
    t = trainer([dp2], max_epochs=2)
    t.fit(model(), data(tiny_mnist), ckpt_path=str(tmp_path / "last.ckpt"))
    assert dp2.ledger == [[1.0, 0.1, 20]] and t.global_step == 20
    assert dp2.report["epsilon"] == pytest.approx(epsilon([(1.0, 0.1, 20)], 1e-4, "rdp"))


def test_resume_from_non_private_checkpoint_is_refused(tiny_mnist, tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer([ckpt], max_epochs=1, enable_checkpointing=True).fit(model(), data(tiny_mnist))
    dp = DPSGD(noise_multiplier=1.0, delta=1e-4)
    with pytest.raises(PrivacyError, match="without a DP-SGD ledger"):
        trainer([dp], max_epochs=2).fit(model(), data(tiny_mnist),
                                        ckpt_path=str(tmp_path / "last.ckpt"))


class Marked(L.Callback):
    mixes_batch = True


@pytest.mark.parametrize("case,match", [
    ("batchnorm", "GroupNorm"),
    ("kmixup", "mix examples"),
    ("mixup", "mix examples"),
    ("marked", "mix examples"),
    ("accumulate", "raise data.batch_size"),
    ("clip", "max_grad_norm"),
    ("iterable", "map-style dataset"),
    ("delta", "delta < 1/N"),
])
def test_refusals_name_the_fix(tiny_mnist, case, match):
    dp = DPSGD(noise_multiplier=1.0, delta=1e-2 if case == "delta" else 1e-5)
    m = model(arch="cnn", norm="batch", width=4) if case == "batchnorm" else model()
    extra = {"kmixup": [KMixup(k=4)], "mixup": [Mixup()], "marked": [Marked()]}.get(case, [])
    cbs = [dp] + extra
    kw = {"accumulate": {"accumulate_grad_batches": 2}, "clip": {"gradient_clip_val": 1.0}}.get(case, {})
    dm = data(tiny_mnist)
    if case == "iterable":
        dm.setup()

        class Stream(IterableDataset):
            def __iter__(self):
                return iter(dm.train_set)
        dm.train_dataloader = lambda: DataLoader(Stream(), batch_size=50)
    with pytest.raises(PrivacyError, match=match):
        trainer(cbs, **kw).fit(m, dm)


def test_shuffling_accepted_explicitly_is_reported_as_such(tiny_mnist):
    dp = DPSGD(noise_multiplier=2.0, delta=1e-4, sampling="shuffle", accountant="rdp")
    t = trainer([dp], max_epochs=2)
    t.fit(model(), data(tiny_mnist))
    r = dp.report
    assert "no privacy amplification" in r["analysis"] and r["sample_rate"] == 1.0
    assert r["ledger"] == [[2.0, 1.0, 2]]  # two passes, each one full-batch Gaussian release
    assert r["epsilon"] == pytest.approx(epsilon([(2.0, 1.0, 2)], 1e-4, "rdp"))
    assert r["steps"] == t.global_step == 2 * math.floor(500 / 50)


@pytest.mark.slow  # two processes
def test_ddp_two_processes_reproduce_one(tiny_mnist, tmp_path):
    """ddp_spawn on 2 CPU ranks (gloo) with the global sample rate of 1 process: the
    same global Poisson batches, clipping per rank before the all-reduce and the noise
    added once give the 1-process weights (float round-off aside)."""
    L.seed_everything(0)
    init = [p.detach().clone() for p in model().parameters()]
    runs = {}
    for world in (1, 2):
        L.seed_everything(0)
        m = model()
        dp = DPSGD(noise_multiplier=1.0, delta=1e-4, max_grad_norm=0.5, accountant="rdp", seed=3)
        kw = {"strategy": "ddp_spawn", "devices": 2} if world == 2 else {"devices": 1}
        t = trainer([dp], max_steps=4, accelerator="cpu", limit_val_batches=0,
                    default_root_dir=str(tmp_path / str(world)), **kw)
        t.fit(m, data(tiny_mnist, batch_size=50 // world))
        runs[world] = [p.detach().clone() for p in m.parameters()]
    moved = sum((a - b).norm() for a, b in zip(runs[1], init))
    assert moved > 1e-2  # the runs trained
    for a, b in zip(runs[1], runs[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_scattering_features_are_the_fixed_transform(tiny_mnist, tmp_path):
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    from toolkit.data.scattering import ScatterImageDataModule
    kw = dict(root=str(tiny_mnist), val_size=100, train_subset=60, seed=0)
    plain = ImageDataModule(**kw)
    plain.setup()
    dm = ScatterImageDataModule(**kw, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.feature_shape == (81, 7, 7) and len(dm.train_set) == 60
    ref = ScatteringTorch2D(J=2, shape=(28, 28))(plain.test_set.tensors[0][:5]).flatten(1, 2)
    torch.testing.assert_close(dm.test_set.tensors[0][:5], ref)
    assert torch.equal(dm.train_set.tensors[1], plain.train_set.tensors[1])
    again = ScatterImageDataModule(**kw, cache_dir=str(tmp_path))
    again.setup()  # from the cache
    assert torch.equal(again.train_set.tensors[0], dm.train_set.tensors[0])
    assert len(list(tmp_path.glob("scatter_*.pt"))) == 1
