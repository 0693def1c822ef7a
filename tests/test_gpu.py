"""Checks that need a CUDA device (``@pytest.mark.gpu``; skipped without one). They run in
``python -m scripts.gpu_check`` on a GPU machine; docs/devices.md lists them."""
from __future__ import annotations

import pytest
import torch

import optimizers
import regularizers
from optimizers import newton_schulz
from toolkit.seeding import generator

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _gpt(device="cuda"):
    from toolkit.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, block_size=32, dropout=0.1)).to(device)


def test_checkpoint_rng_state_restores_cuda_draws():
    from toolkit.callbacks import RNGState
    torch.cuda.manual_seed_all(5)
    saved = RNGState().state_dict()
    assert len(saved["rng"]["cuda"]) == torch.cuda.device_count()
    want = torch.rand(8, device="cuda")
    torch.cuda.manual_seed_all(123)  # anything: the restore must undo it
    cb = RNGState()
    cb.load_state_dict(saved)
    cb.on_train_start(None, None)
    assert torch.equal(torch.rand(8, device="cuda"), want)


def test_lm_with_dropout_resumes_bitwise_on_cuda(tmp_path, monkeypatch):
    import tests.test_resume as resume
    from toolkit import LanguageModel, TextDataModule
    base = resume.trainer
    monkeypatch.setattr(resume, "trainer", lambda **kw: base(**{**kw, "accelerator": "cuda",
                                                                "devices": 1}))
    make_model = lambda: LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2,  # noqa
                                       n_embd=32, dropout=0.1, lr=3e-3, warmup_steps=2)
    make_data = lambda: TextDataModule(block_size=16, batch_size=8)  # noqa: E731
    resume.assert_bitwise(*resume.straight_and_resumed(make_model, make_data, tmp_path,
                                                       total=12, stop_at=6))


def test_plugin_generators_draw_on_the_tensors_device():
    model = _gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    noise = regularizers.LangevinNoise(temperature=1e-4, seed=1)
    noise._seed = 1
    before = [p.detach().clone() for p in model.parameters()]
    noise.after_step(opt)  # a CPU generator here would raise: the draw is on cuda
    p0 = next(model.parameters())
    xi = torch.randn(p0.shape, generator=generator(1, 0, device="cuda"), device="cuda")
    torch.testing.assert_close(p0 - before[0], xi * (2 * 0.1 * 1e-4) ** 0.5)
    # Gumbel samples of BitWidthSearch: a cuda generator for cuda logits
    logits = torch.zeros(3, 4, device="cuda", requires_grad=True)
    onehot, index = optimizers.gumbel_straight_through(logits, 1.0, generator(0, 0, device="cuda"))
    assert onehot.device.type == index.device.type == "cuda"
    # k-mixup: CPU generator by design, results on the batch's device
    mixer = regularizers.KMixup(k=2, num_classes=10, seed=0)
    mixer._rank, mixer._seed, mixer._classes = 0, 0, 10
    x, y = torch.randn(8, 3, device="cuda"), torch.arange(8, device="cuda")
    xm, ym = mixer.mix_batch((x, y))
    assert xm.device.type == ym.device.type == "cuda"


def test_ns_auto_uses_bf16_products_on_this_gpu():
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    assert newton_schulz._resolve("auto", dev) == ("bf16" if cap >= (8, 0) else "fp32")
    g = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz.orthogonalize(g.cuda()).float().cpu()
    ref = newton_schulz.orthogonalize(g, dtype=torch.float32)  # fp32 quintic on CPU
    assert (ours - ref).norm() / ref.norm() < 0.03  # bf16 rounding of 5 steps, not a bug


@pytest.mark.parametrize("name", ["muon", "muonpp", "hyperp", "auon", "hybrid_auon", "adamw"])
def test_optimizer_steps_do_not_sync_with_the_gpu(name):
    model = _gpt()
    opt = optimizers.build_optimizer(model, name)
    x = torch.randint(0, 65, (4, 33), device="cuda")

    def step():
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    step()  # state creation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call raises
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_dpsgd_trains_on_cuda(tmp_path):
    # DP noise must be drawn by a generator on the gradients' device (regularizers/dp)
    import lightning as L

    from tests.helpers import write_fake_mnist
    from toolkit import Classifier, ImageDataModule
    from toolkit.cli import trainer
    L.seed_everything(0)
    root = write_fake_mnist(tmp_path / "mnist", n_train=600, n_test=100)
    model = Classifier(arch="mlp", hidden=[32], optimizer="sgd", lr=0.1, warmup_steps=0)
    dp = regularizers.DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=1.0)
    t = trainer(max_steps=3, accelerator="cuda", devices=1, callbacks=[dp], logger=False,
                enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                num_sanity_val_steps=0)
    t.fit(model, datamodule=ImageDataModule(root=str(root), val_size=100, batch_size=32))
    assert t.global_step == 3 and all(torch.isfinite(p).all() for p in model.parameters())
