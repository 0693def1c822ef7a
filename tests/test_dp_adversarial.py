"""Red-team tests of DPSGD: each configuration class of the privacy review is either refused
with a clear PrivacyError before its first step, or its released update has add/remove-one
sensitivity <= C, measured black-box: one step of SGD (lr 1) with q = 1 on D and on D minus
an outlier, same seed (so the same noise), and the difference of (w0 - w1) * N."""
import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from regularizers import DPSGD
from regularizers.dp import PrivacyError
from regularizers.dp import mechanism
from regularizers.dp.loader import why_not_once_per_pass
from toolkit.models import GPT, GPTConfig

warnings.filterwarnings("ignore", message="DPSGD.seed")
C = 0.5


class Plain(L.LightningModule):
    """A user's LightningModule that knows nothing of DP."""

    def __init__(self, net, loss=None, extra=(), lr=1.0, optimizer=torch.optim.SGD):
        super().__init__()
        self.net, self.loss, self.extra, self.lr, self.opt = net, loss, list(extra), lr, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        loss = self.loss(out, y) if self.loss else F.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                                   y.reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return self.opt(list(self.parameters()) + self.extra, lr=self.lr)


def fit(module, x, y, callbacks, batch_size=None, collate_fn=None, **kw):
    dl = DataLoader(TensorDataset(x, y), batch_size=batch_size or len(x), collate_fn=collate_fn)
    kw = {"max_steps": 1, "logger": False, "enable_checkpointing": False, "accelerator": "cpu",
          "enable_progress_bar": False, "enable_model_summary": False, **kw}
    t = L.Trainer(callbacks=callbacks, **kw)
    t.fit(module, dl)
    return t


def dp(**kw):
    return DPSGD(**{"noise_multiplier": 1.0, "delta": 1e-3, "max_grad_norm": C, "seed": 7, **kw})


def flat(module):
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def released_sum(make, x, y, callbacks=(), **kw):
    """(w0 - w1) * N after one SGD(lr 1) step with q = 1: the noisy clipped sum."""
    module = make()
    w0 = flat(module)
    fit(module, x, y, [dp(**kw.pop("dp", {}))] + list(callbacks), **kw)
    return (w0 - flat(module)) * len(x)


def sensitivity(make, x, y, **kw):
    """||release(D) - release(D minus example 0)||, example 0 being a large outlier."""
    x = x.clone()
    x[0] = x[0] * 1e3 if x.is_floating_point() else x[0]
    a = released_sum(make, x, y, **dict(kw))
    b = released_sum(make, x[1:], y[1:], **dict(kw))
    return float((a - b).norm())


def mlp(seed=0, d=6, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, k))


X, Y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 3


def test_black_box_measurement_sees_a_broken_clip(monkeypatch):
    """The yardstick itself: the real mechanism stays within C, clipping off does not."""
    make = lambda: Plain(mlp())  # noqa: E731
    assert sensitivity(make, X, Y) <= C * (1 + 1e-4)
    monkeypatch.setattr(mechanism, "clip_factors", lambda n, c: torch.ones_like(n))
    assert sensitivity(make, X, Y) > 10 * C


# ------------------------------------------------------------ 1. bypassing the mechanism
def test_a_tensor_outside_the_module_in_the_optimizer_is_refused():
    temp = torch.ones(1, requires_grad=True)

    class Temp(Plain):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x) / temp, y)
    with pytest.raises(PrivacyError, match="does not privatize"):
        fit(Temp(mlp(), extra=[temp]), X, Y, [dp()])


class Unfreeze(L.Callback):
    """The BackboneFinetuning pattern: frozen at fit start, trainable once training runs."""

    def on_train_start(self, trainer, pl_module):
        for p in pl_module.net[0].parameters():
            p.requires_grad_(True)


def test_a_layer_unfrozen_after_fit_start_is_privatized():
    def make():
        m = Plain(mlp())
        for p in m.net[0].parameters():
            p.requires_grad_(False)
        return m
    w0 = make().net[0].weight.detach().clone()
    m = make()
    fit(m, X, Y, [dp(), Unfreeze()])
    assert not torch.equal(m.net[0].weight, w0)  # it did train
    assert sensitivity(make, X, Y, callbacks=[Unfreeze()]) <= C * (1 + 1e-4)


def test_an_optimizer_that_reevaluates_its_closure_is_refused():
    with pytest.raises(PrivacyError, match="LBFGS"):
        fit(Plain(mlp(), optimizer=torch.optim.LBFGS), X, Y, [dp()])

    class TwiceSGD(torch.optim.SGD):  # an unknown optimizer doing what LBFGS does
        def step(self, closure=None):
            closure()
            return super().step(closure)
    with pytest.raises(PrivacyError, match="closure more than once"):
        fit(Plain(mlp(), optimizer=TwiceSGD), X, Y, [dp()])


# ------------------------------------------------------------ 2. mixing and data-dependent writes
class Centered(nn.Module):
    def forward(self, x):
        return x - x.mean(0)


class FunctionalBN(nn.Module):
    def forward(self, x):
        return F.batch_norm(x, None, None, training=True)


class RunningMean(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x


def contrastive(out, y):
    """In-batch InfoNCE: every example's loss depends on every other example."""
    z = F.normalize(out, dim=1)
    return F.cross_entropy(z @ z.T / 0.1, torch.arange(len(z)))


def test_batch_statistics_that_fail_on_one_example_are_refused_with_the_reason():
    m = Plain(nn.Sequential(nn.Linear(6, 8), FunctionalBN(), nn.Linear(8, 3)))
    w0 = flat(m)
    with pytest.raises(PrivacyError, match="fails on a batch of one"):
        fit(m, X, Y, [dp()])
    assert torch.equal(flat(m), w0)


@pytest.mark.parametrize("case", ["center", "contrastive"])
def test_steps_that_mix_examples_are_computed_alone_within_c(case):
    """Batch statistics and in-batch losses couple examples on the step they run: that
    step's per-example gradients are computed with every example alone (issue 23)."""
    def make():
        torch.manual_seed(0)
        if case == "center":
            return Plain(nn.Sequential(nn.Linear(6, 8), Centered(), nn.Tanh(), nn.Linear(8, 3)))
        return Plain(mlp(), loss=contrastive)
    assert sensitivity(make, X, Y) <= C * (1 + 1e-4)


@pytest.mark.parametrize("case,match", [("buffer", "outlives the step"), ("max_norm", "max_norm")])
def test_data_dependent_writes_are_refused(case, match):
    torch.manual_seed(0)
    x, y = X, Y
    if case == "buffer":
        net = nn.Sequential(RunningMean(6), nn.Linear(6, 3))
    else:
        net = nn.Sequential(nn.Embedding(20, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 3))
        x = torch.randint(0, 20, (8, 3))
    m = Plain(net)
    w0 = flat(m)
    with pytest.raises(PrivacyError, match=match):
        fit(m, x, y, [dp()])
    assert torch.equal(flat(m), w0)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in m.buffers())


def two_views(items):
    x = torch.stack([i[0] for i in items])
    y = torch.stack([i[1] for i in items])
    return torch.cat([x, x.flip(1)]), torch.cat([y, y])


def mixing_collate(items):
    x = torch.stack([i[0] for i in items])
    return 0.5 * (x + x.roll(1, 0)), torch.stack([i[1] for i in items])


def test_a_collate_function_that_adds_rows_is_refused():
    with pytest.raises(PrivacyError, match="rows but the sampler.s draw"):
        fit(Plain(mlp()), X, Y, [dp()], collate_fn=two_views)


def test_a_collate_function_that_mixes_rows_is_computed_alone_within_c():
    assert sensitivity(lambda: Plain(mlp()), X, Y, collate_fn=mixing_collate) <= C * (1 + 1e-4)


def test_a_tensor_dataset_keeps_the_users_collate_fn():
    seen = []

    def doubled(items):
        seen.append(len(items))
        return torch.stack([i[0] for i in items]) * 2, torch.stack([i[1] for i in items])
    assert sensitivity(lambda: Plain(mlp()), X, Y, collate_fn=doubled) <= C * (1 + 1e-4)
    seen.clear()
    m = Plain(mlp())
    fit(m, X, Y, [dp()], collate_fn=doubled, max_steps=3)
    assert seen, "the Poisson loader bypassed the user's collate_fn"


# ------------------------------------------------------------ 3. checks in the right place
def test_delta_above_one_over_n_is_refused_before_any_step():
    m = Plain(mlp())
    w0 = flat(m)
    with pytest.raises(PrivacyError, match="delta < 1/N"):
        fit(m, X, Y, [dp(delta=0.5)], max_steps=5)
    assert torch.equal(flat(m), w0)


def test_accumulation_switched_on_mid_run_is_refused():
    m = Plain(mlp())
    sched = GradientAccumulationScheduler(scheduling={0: 1, 1: 2})
    with pytest.raises(PrivacyError, match="accumulate_grad_batches=2"):
        fit(m, X, Y, [dp(), sched], batch_size=2, max_steps=-1, max_epochs=3)


class Growing(Plain):
    """A loader rebuilt every epoch with a growing batch: q changes mid-run."""

    def __init__(self, data):
        super().__init__(mlp())
        self.data = data

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=10 * (1 + self.current_epoch))


@pytest.mark.slow  # six epochs, sigma recalibrated at every new rate
def test_target_epsilon_holds_when_the_sample_rate_grows():
    x = torch.randn(200, 6)
    y = torch.randint(0, 3, (200,))
    cb = dp(noise_multiplier=None, target_epsilon=2.0, delta=1e-4, accountant="rdp")
    t = L.Trainer(callbacks=[cb], max_epochs=6, reload_dataloaders_every_n_epochs=1, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu")
    t.fit(Growing(TensorDataset(x, y)))
    assert len({q for _, q, _ in cb.ledger}) >= 2  # the rate did change
    assert cb.epsilon() <= 2.0
    # and the budget was used: one more step at the last rate would exceed it
    sigma, q, _ = cb.ledger[-1]
    assert cb.budget.epsilon((sigma, q, 1)) > 2.0


def test_mechanism_arithmetic_is_fp32_under_bf16_mixed():
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.arange(64) % 3
    s = sensitivity(lambda: Plain(mlp()), x, y, precision="bf16-mixed")
    assert s <= C * (1 + 1e-4)


def test_shuffle_refuses_loaders_that_show_an_example_twice_per_pass():
    ds = TensorDataset(torch.randn(9, 6), torch.arange(9) % 3)
    padded = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, 2, 0, drop_last=False))
    assert "repeating" in why_not_once_per_pass(padded)
    exact = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, 2, 0, drop_last=True))
    assert why_not_once_per_pass(exact) is None

    class Cycle(IterableDataset):
        def __iter__(self):
            for _ in range(5):
                yield from ds

    class Streamed(Plain):
        def train_dataloader(self):
            return DataLoader(Cycle(), batch_size=3)
    t = L.Trainer(callbacks=[dp(sampling="shuffle", delta=1e-2)], max_steps=2, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    with pytest.raises(PrivacyError, match="iterable"):
        t.fit(Streamed(mlp()))


# ------------------------------------------------------------ 4. bad input
@pytest.mark.parametrize("arg", ["noise_multiplier", "max_grad_norm", "target_epsilon", "delta"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 0.0, True, "1"])
def test_numeric_arguments_are_checked_at_construction(arg, value):
    kw = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    with pytest.raises(ValueError, match=arg):
        DPSGD(**{**kw, arg: value})


# ------------------------------------------------------------ 5. private but wrong, or crashing
@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_conv_padding_modes_train_within_c(mode):
    def make():
        torch.manual_seed(0)
        return Plain(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode=mode),
                                   nn.Flatten(), nn.Linear(2 * 5 * 5, 3)))
    x = torch.randn(6, 1, 5, 5)
    assert sensitivity(make, x, torch.arange(6) % 3) <= C * (1 + 1e-4)


@pytest.mark.parametrize("case,match", [
    ("scale_grad_by_freq", "scale_grad_by_freq"),
    ("weight_norm", "parametrization"),
    ("spectral_norm", "parametrization"),
    ("old_weight_norm", "weight_norm"),
    ("lstm", "DPLSTM"),
])
def test_layers_without_exact_private_gradients_are_refused(case, match):
    torch.manual_seed(0)
    x = X
    if case == "scale_grad_by_freq":
        net = nn.Sequential(nn.Embedding(5, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 3))
        x = torch.randint(0, 5, (8, 3))
    elif case == "lstm":
        class Last(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn, self.head = nn.LSTM(6, 4, batch_first=True), nn.Linear(4, 3)

            def forward(self, x):
                return self.head(self.rnn(x[:, None])[0][:, -1])
        net = Last()
    else:
        lin = nn.Linear(6, 3)
        wrap = {"weight_norm": nn.utils.parametrizations.weight_norm,
                "spectral_norm": nn.utils.parametrizations.spectral_norm,
                "old_weight_norm": nn.utils.weight_norm}[case]
        net = wrap(lin)
    with pytest.raises(PrivacyError, match=match):
        fit(Plain(net), x, Y, [dp()])


def test_the_suggested_dplstm_trains_within_c():
    from opacus.layers import DPLSTM

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = DPLSTM(6, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.rnn(x.view(len(x), 2, 3).repeat(1, 1, 2))[0][:, -1])

    def make():
        torch.manual_seed(0)
        return Plain(Last())
    assert sensitivity(make, X, Y) <= C * (1 + 1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_the_toolkits_gpt_trains_within_c(bias):
    def make():
        torch.manual_seed(0)
        return Plain(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8,
                                   bias=bias)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 11, (6, 8), generator=g), torch.randint(0, 11, (6, 8), generator=g)
    x[0] = 0  # the outlier: a block of one repeated token
    # (dropout stays 0: with it the masks of the other examples are drawn in another order
    # on D and D minus one, so a fixed seed no longer couples the two runs example by example)
    assert sensitivity(make, x, y) <= C * (1 + 1e-4)


# ------------------------------------------------------------ per-layer exactness
def hf_conv1d():
    from transformers.pytorch_utils import Conv1D
    return nn.Sequential(Conv1D(5, 6), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 3))


LAYERS = {
    "conv2d-circular": lambda: (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
                                              nn.Flatten(), nn.Linear(3 * 25, 3)), (2, 5, 5)),
    "conv2d-reflect-stride2": lambda: (nn.Sequential(nn.Conv2d(2, 3, 3, 2, 1, padding_mode="reflect"),
                                                     nn.Flatten(), nn.Linear(3 * 9, 3)), (2, 5, 5)),
    "conv2d-same-dilated": lambda: (nn.Sequential(nn.Conv2d(2, 3, (2, 3), padding="same", dilation=2),
                                                  nn.Flatten(), nn.Linear(3 * 25, 3)), (2, 5, 5)),
    "conv1d-replicate": lambda: (nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, padding_mode="replicate"),
                                               nn.Flatten(), nn.Linear(3 * 9, 3)), (2, 7)),
    "layernorm-no-bias": lambda: (nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False),
                                                nn.Linear(8, 3)), (4, 6)),
    "layernorm-2d": lambda: (nn.Sequential(nn.LayerNorm((4, 6)), nn.Flatten(), nn.Linear(24, 3)), (4, 6)),
    "rmsnorm": lambda: (nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Linear(8, 3)), (4, 6)),
    "hf-conv1d": lambda: (hf_conv1d(), (4, 6)),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_per_example_gradients_equal_a_naive_loop(name):
    from regularizers.dp import PerSampleGradients
    torch.manual_seed(0)
    net, shape = LAYERS[name]()
    net = net.double()
    x, y = torch.randn(5, *shape, dtype=torch.float64), torch.arange(5) % 3
    out_of = lambda xb: net(xb).reshape(len(xb), -1, 3).mean(1)  # noqa: E731
    eng = PerSampleGradients(net)
    with eng.capture():
        F.cross_entropy(out_of(x), y).backward()
    pieces = eng.pieces()
    params = eng.params
    assert set(pieces) == set(params)
    for i in range(len(x)):
        ref = torch.autograd.grad(F.cross_entropy(out_of(x[i:i + 1]), y[i:i + 1]), params)
        for p, r in zip(params, ref):
            torch.testing.assert_close(pieces[p].materialize()[i], r, rtol=1e-9, atol=1e-12)
            e = torch.zeros(len(x), dtype=torch.float64)
            e[i] = 1
            torch.testing.assert_close(pieces[p].weighted_sum(e), r, rtol=1e-9, atol=1e-12)
        n2 = sum(pieces[p].norm2()[i] for p in params)
        torch.testing.assert_close(n2, sum(r.square().sum() for r in ref), rtol=1e-9, atol=1e-12)


def test_training_metrics_can_be_kept_out_of_the_logs():
    for hide in (False, True):
        m = Plain(mlp())
        t = fit(m, X, Y, [dp(hide_training_metrics=hide)], max_steps=-1, max_epochs=1)
        assert ("train/loss" in t.logged_metrics) is not hide
        assert "dp/epsilon" in t.logged_metrics
        assert "log" not in vars(m)  # the module is left as it was


class Ragged(torch.utils.data.Dataset):
    """Token sequences of different lengths, as NLP datasets are."""

    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.xs = [torch.randint(1, 20, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
                   for _ in range(n)]

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return self.xs[i], torch.tensor(i % 3)


def pad_to_longest(items):
    x = nn.utils.rnn.pad_sequence([i[0] for i in items], batch_first=True)  # pads with 0
    return x, torch.stack([i[1] for i in items])


class Pooled(L.LightningModule):
    def __init__(self, masked):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head, self.masked = nn.Embedding(20, 8), nn.Linear(8, 3), masked

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.emb(x)
        if self.masked:
            m = (x != 0).unsqueeze(-1).float()
            h = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:  # the pads of the longest example leak into everyone's mean
            h = h.mean(1)
        return F.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


@pytest.mark.parametrize("masked", [True, False])
def test_padding_to_the_longest_example_trains_each_example_alone(masked):
    """Masked or not, a padded row is not its example collated alone, so each step runs
    with every example alone (tests/test_dp_every_step.py measures the unmasked case)."""
    t = L.Trainer(callbacks=[dp()], max_steps=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    dl = DataLoader(Ragged(), batch_size=4, collate_fn=pad_to_longest)
    t.fit(Pooled(masked), dl)
    assert t.global_step == 2


FSDP2_DP = """
import socket, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from regularizers.dp import PrivacyError
from regularizers.dp.validate import check_not_sharded
from toolkit.models.gpt import GPT, GPTConfig
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, block_size=8))
check_not_sharded(model, object())  # whole parameters: fine
mesh = init_device_mesh("cpu", (1,))
for block in model.blocks:
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
try:
    check_not_sharded(model, object())
except PrivacyError as e:
    print("refused" if "strategy='ddp'" in str(e) else e)
dist.destroy_process_group()
"""


@pytest.mark.slow  # a second process (one gloo rank)
def test_fsdp2_sharded_parameters_are_refused():
    """A real ``fully_shard`` (DTensor parameters, one gloo rank): per-example norms would
    need every shard, so DP-SGD refuses instead of clipping local shards."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", FSDP2_DP], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["refused"]
