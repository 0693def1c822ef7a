"""Noise is never drawn twice (issue 23, item 6), measured black-box: a bias-free network on
all-zero inputs has zero gradients, so each released update is the noise alone. A second
``trainer.fit`` of one DPSGD and every resume draw fresh noise, a seed reproduces only the
first fit of a fresh ledger, and the ledger counts every step and every fit."""
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regularizers import DPSGD

pytestmark = pytest.mark.filterwarnings("ignore:DPSGD.seed")
N = 8
DATA = TensorDataset(torch.zeros(N, 6), torch.arange(N) % 3)


class Zero(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Releases(L.Callback):
    """The released updates, read off the weights after each step (w_{t-1} - w_t)."""

    def __init__(self):
        self.updates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        after = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        self.updates.append(self.before - after)


def dp(seed=7):
    return DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp", seed=seed)


def fit(module, cb, steps, ckpt_path=None, extra=(), **kw):
    rec = Releases()
    t = L.Trainer(callbacks=[cb, rec, *extra], max_steps=steps, logger=False, accelerator="cpu",
                  enable_checkpointing=bool(extra), enable_progress_bar=False,
                  enable_model_summary=False, **kw)
    t.fit(module, DataLoader(DATA, batch_size=N), ckpt_path=ckpt_path)  # q = 1
    return torch.stack(rec.updates)


def disjoint(a, b):
    """No update of ``a`` equals (or nearly equals) any update of ``b``."""
    return bool((torch.cdist(a, b) > 0.1 * a.norm(dim=1).mean()).all())


def test_a_second_fit_of_one_instance_draws_fresh_noise():
    cb, m = dp(), Zero()
    first = fit(m, cb, 3)
    assert first.norm(dim=1).min() > 0  # the release is the noise: zero gradients
    second = fit(m, cb, 3)  # a new Trainer: global_step restarts at 0, the noise must not
    assert disjoint(first, second)
    assert cb.ledger == [[1.0, 1.0, 6]] and cb.budget.fits == 2
    assert cb.report["fits"] == 2 and cb.report["noise_from_seed"] is False
    # the seed still reproduces a first fit exactly
    again = dp()
    torch.testing.assert_close(fit(Zero(), again, 3), first, rtol=0, atol=0)
    assert again.report["noise_from_seed"] is True


def test_a_resume_from_an_earlier_checkpoint_draws_fresh_noise(tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1,
                                               save_top_k=-1, filename="{step}")
    original = fit(Zero(), dp(), 4, extra=[ckpt])
    early = str(tmp_path / "step=2.ckpt")
    resumed = []
    for _ in range(2):  # twice from the same checkpoint, each with the same fixed seed
        cb = dp()
        resumed.append(fit(Zero(), cb, 4, ckpt_path=early))
        assert len(resumed[-1]) == 2
        assert cb.ledger == [[1.0, 1.0, 4]]  # the checkpoint's 2 steps, then 2 more
        assert cb.budget.fits == 2 and cb.report["accounted_steps"] == 4
    assert disjoint(resumed[0], original[2:]) and disjoint(resumed[1], original[2:])
    assert disjoint(resumed[0], resumed[1])
    state = torch.load(early, weights_only=True)["callbacks"]
    assert next(v for k, v in state.items() if k.startswith("DPSGD"))["fits"] == 1
