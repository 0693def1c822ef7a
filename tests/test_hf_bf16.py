"""precision="bf16-mixed" on CPU with HF models: each matrix optimizer trains and keeps fp32
weights and state; monitors and k-mixup work under autocast."""
import lightning as L
import pytest
import torch

import regularizers
from toolkit import HFCausalLM, HFClassifier
from toolkit.monitors import MassiveActivationMonitor, SpectralMonitor, StabilityMonitor

from .test_conv1d_orientation import MATRIX
from .test_hf_plugins import ARCHS, LR, V, Collect, ids


def fit(model, data, steps, callbacks=(), logger=False):
    L.Trainer(max_steps=steps, precision="bf16-mixed", logger=logger, callbacks=list(callbacks),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
              ).fit(model, torch.utils.data.DataLoader(data, batch_size=8))


@pytest.mark.parametrize("name", MATRIX)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matrix_optimizer_under_bf16_mixed_keeps_fp32_state(arch, name):
    torch.manual_seed(0)
    x = ids(8, 16)
    model = HFCausalLM(config=ARCHS[arch], vocab_size=V, optimizer=name, lr=LR.get(name, 0.02),
                       optimizer_kwargs={"adam_lr": 1e-2}, lr_decay="constant")
    before = model.lm_loss((x[:, :-1], x[:, 1:]))[0].item()
    fit(model, [(r[:-1], r[1:]) for r in x], 20)
    opt = model.trainer.optimizers[0]
    dtypes = {t.dtype for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    assert dtypes == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    after = model.lm_loss((x[:, :-1], x[:, 1:]))[0].item()
    assert after < 0.8 * before


def test_monitors_and_kmixup_under_bf16_mixed(tmp_path):
    torch.manual_seed(0)
    data = [(r, r[0] % 3) for r in ids(16, 12)]
    model = HFClassifier(config=ARCHS["llama"], vocab_size=V, num_classes=3, mix_embeddings=True,
                         optimizer="muon", lr=0.02, lr_decay="constant")
    log = Collect()
    mix = regularizers.KMixup(k=4, alpha=0.5, seed=0)
    mons = [MassiveActivationMonitor(every_n_steps=2, out_dir=str(tmp_path), plots=False, fit=False),
            StabilityMonitor(every_n_steps=2), SpectralMonitor(every_n_steps=2, iters=10)]
    fit(model, data, 3, [mix, *mons], log)
    assert mix.batches_mixed == 3
    row = log.rows[2]
    for key in ("stability/attn_z/layer1", "stability/logit_z", "stability/mlp_rms/layer0",
                "massive/ratio/layer1", "spectral/dW/max"):
        assert key in row and torch.isfinite(torch.tensor(row[key])), key


def test_langevin_averaging_and_dpsgd_under_bf16_mixed():
    """The remaining plug-ins: Langevin noise and iterate averaging act on fp32 weights, and
    DP-SGD's probe, clipping and noise run (fp32 mechanism) on an HF model under autocast."""
    import warnings
    torch.manual_seed(0)
    x = ids(16, 12)
    data = [(r[:-1], r[1:]) for r in x]
    model = HFCausalLM(config=ARCHS["llama"], vocab_size=V, optimizer="adamw", lr=1e-2,
                       lr_decay="constant")
    noise = regularizers.LangevinNoise(temperature=1e-6)
    avg = regularizers.IterateAveraging(start_step=1)
    fit(model, data, 4, [noise, avg])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in model.parameters())

    model = HFCausalLM(config=ARCHS["gpt2"], vocab_size=V, optimizer="sgd", lr=0.1,
                       weight_decay=0.0, lr_decay="constant")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = regularizers.DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=1.0, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    fit(model, data, 3, [dp])
    assert dp.budget.steps == 3 and dp.report["epsilon"] > 0
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
