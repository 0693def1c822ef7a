"""Host synchronizations per training step, counted on CPU with toolkit.host_syncs: none in the
matrix optimizers, Langevin noise or the monitors' non-logging steps; exactly the justified
ones elsewhere (docs/devices.md lists each). tests/test_gpu.py repeats the optimizer check
with torch.cuda.set_sync_debug_mode on a GPU, which also sees syncs inside C++ ops."""
import lightning as L
import pytest
import torch

import optimizers
import regularizers
from toolkit import LanguageModel, TextDataModule
from toolkit.cli import trainer
from toolkit.host_syncs import HostSyncs
from toolkit.models.gpt import GPT, GPTConfig
from toolkit.monitors import MassiveActivationMonitor, SpectralMonitor, StabilityMonitor

PROJECT = ("toolkit/", "optimizers/", "regularizers/")


def test_the_checker_sees_every_kind_of_sync():
    t = torch.tensor([1.5, 2.0])
    with HostSyncs() as h:
        if t[0]:
            pass
        float(t[0]), int(t[1]), t[0].item(), t.tolist(), t.cpu(), t.numpy(), t.to("cpu")
        t.nonzero(), list(range(10))[t[1].long()]
        t + 1, t.to(torch.float64)  # not syncs
    assert {m for m, _ in h.calls} == {"__bool__", "__float__", "__int__", "item", "tolist", "cpu",
                                        "numpy", "to(cpu)", "nonzero", "__index__"}
    assert all(site.startswith("tests/test_host_syncs.py:") for _, site in h.calls)
    assert torch.Tensor.item is torch._C.TensorBase.item  # unpatched on exit


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))


@pytest.mark.parametrize("name", optimizers.model_optimizers())
def test_optimizer_steps_do_not_sync(name):
    model = _gpt()
    opt = optimizers.build_optimizer(model, name)
    x = torch.randint(0, 65, (4, 17), generator=torch.Generator().manual_seed(0))
    with HostSyncs() as h:
        for _ in range(3):  # the first step (state creation) included
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    own = {k: v for k, v in h.by_file().items() if not k.endswith("torch/optim/optimizer.py")}
    assert own == {}, h.sites()
    if h.calls:
        # torch.optim's Adam/AdamW read their step counter with .item(): a CPU tensor unless
        # capturable/fused, also on a GPU, so no device sync (asserted, not assumed)
        assert set(h.by_file()) == {"item @ torch/optim/optimizer.py"}
        steps = [s["step"] for s in opt.state.values() if "step" in s]
        assert steps and all(t.device.type == "cpu" for t in steps)


def test_langevin_noise_does_not_sync():
    model = _gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = regularizers.LangevinNoise(temperature=1e-4, seed=1)
    noise._seed = 1
    before = [p.detach().clone() for p in model.parameters()]
    with HostSyncs() as h:
        noise.after_step(opt)
    assert h.calls == {}, h.sites()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _mixer(cls, **kw):
    m = cls(num_classes=10, seed=0, **kw)
    m._rank, m._seed, m._classes = 0, 0, 10
    return m


@pytest.mark.parametrize("cls, kw, per_batch", [
    # mixup: lambda via scipy.special.betaincinv reads one uniform drawn by the CPU generator,
    # and the CPU-drawn shuffle (n integers) goes to the batch's device (here: "to cpu")
    (regularizers.Mixup, {}, {"item @ regularizers/kmixup/core.py": 1,
                              "to(cpu) @ regularizers/kmixup/core.py": 1}),
    # k-mixup: also the block cost matrices, solved by scipy's assignment on the host (one
    # transfer: .cpu() then .numpy() of the host copy)
    (regularizers.KMixup, {"k": 4}, {"item @ regularizers/kmixup/core.py": 1,
                                     "to(cpu) @ regularizers/kmixup/core.py": 1,
                                     "cpu @ regularizers/kmixup/core.py": 1,
                                     "numpy @ regularizers/kmixup/core.py": 1}),
])
def test_mixing_syncs_only_where_justified(cls, kw, per_batch):
    mixer = _mixer(cls, **kw)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 1, 4, 4, generator=g), torch.randint(0, 10, (16,), generator=g))
    with HostSyncs(only=PROJECT) as first:
        mixer.mix_batch(batch)
    with HostSyncs(only=PROJECT) as later:
        for _ in range(3):
            mixer.mix_batch(batch)
    assert later.by_file() == {k: 3 * v for k, v in per_batch.items()}, later.sites()
    # the first batch of a fit also checks the target values (index range): host syncs once
    assert first.total > sum(per_batch.values())


class Window(L.Callback):
    """Opens ``syncs`` at the start of the batches of ``steps`` (first in the callback list)
    or closes it at their end (last in the list): the monitors' hooks fall inside."""

    def __init__(self, syncs: HostSyncs, steps: set[int], opens: bool):
        self.syncs, self.steps, self.opens = syncs, steps, opens

    def on_train_batch_start(self, trainer, *args):
        if self.opens and trainer.global_step in self.steps:
            self.syncs.__enter__()

    def on_train_batch_end(self, trainer, *args):
        if not self.opens and trainer.global_step - 1 in self.steps:
            self.syncs.__exit__()


def _fit_counting(steps: set[int], root, only=PROJECT) -> HostSyncs:
    L.seed_everything(0)
    syncs = HostSyncs(only=only)
    model = LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16,
                          optimizer="muon", warmup_steps=2)
    cbs = [Window(syncs, steps, True), SpectralMonitor(every_n_steps=3),
           MassiveActivationMonitor(every_n_steps=3, fit=False, plots=False),
           StabilityMonitor(every_n_steps=3), regularizers.LangevinNoise(temperature=1e-6),
           regularizers.LRSpike(start=1, length=2, factor=10.0), Window(syncs, steps, False)]
    t = trainer(max_steps=4, callbacks=cbs, logger=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                enable_checkpointing=False, default_root_dir=root)  # the monitor's csv goes here
    t.fit(model, datamodule=TextDataModule(block_size=16, batch_size=8))
    return syncs


def test_a_training_step_syncs_once_between_logging_steps(tmp_path):
    # steps 1 and 2: no monitor measures; Muon, Langevin, LRSpike, the module and the data
    # add nothing; the FiniteGuard's one check per step is the only sync (docs/devices.md)
    syncs = _fit_counting({1, 2}, tmp_path)
    assert syncs.by_file() == {"__bool__ @ toolkit/callbacks.py": 2}, syncs.sites()


def test_the_monitors_do_sync_on_their_logging_steps(tmp_path):
    # the same count on a logging step sees the monitors (so the check above can fail)
    syncs = _fit_counting({3}, tmp_path, only=("toolkit/monitors/",))
    files = {k.split(" @ ")[1] for k in syncs.by_file()}
    assert {"toolkit/monitors/spectral/core.py"} <= files, syncs.sites()
    assert any(f.startswith(("toolkit/monitors/massive", "toolkit/monitors/stability"))
               for f in files), syncs.sites()


def test_a_dp_sgd_step_the_tracker_separates_does_not_sync():
    """DP-SGD's step guard (row tracker, canonical loss gradient), the clipped sum and the
    noise stay on the device: between logging steps only the FiniteGuard's check syncs."""
    L.seed_everything(0)
    syncs = HostSyncs(only=PROJECT)
    model = LanguageModel(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=16,
                          warmup_steps=2)
    dp = regularizers.DPSGD(noise_multiplier=1.0, delta=1e-6, max_grad_norm=1.0)
    cbs = [Window(syncs, {1, 2}, True), dp, Window(syncs, {1, 2}, False)]
    t = trainer(max_steps=3, callbacks=cbs, logger=False, enable_progress_bar=False,
                enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                enable_checkpointing=False)
    t.fit(model, datamodule=TextDataModule(block_size=16, batch_size=8,
                                           train_blocks="disjoint"))
    assert syncs.by_file() == {"__bool__ @ toolkit/callbacks.py": 2}, syncs.sites()
