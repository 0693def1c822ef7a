"""torch.compile of the toolkit GPT and an HF Llama (``compile: true`` in the modules) with a
matrix optimizer and all three monitors: the compiled run trains like the eager one, and the
monitors, whose hooks exist only on logging steps (recompiles allowed there), report."""
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from toolkit import HFCausalLM, LanguageModel, TextDataModule
from toolkit.monitors import MassiveActivationMonitor, SpectralMonitor, StabilityMonitor

LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}


class Capture(Logger):
    """Keeps what the monitors send to the loggers."""

    def __init__(self):
        super().__init__()
        self.metrics = {}

    name, version = "capture", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)


class Losses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def run(kind: str, compile: bool):
    L.seed_everything(0, verbose=False)
    if kind == "gpt":
        model = LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32,
                              optimizer="muon", lr=0.02, compile=compile)
    else:
        model = HFCausalLM(config=LLAMA, vocab_size=65, optimizer="muon", lr=0.02, compile=compile)
    losses = Losses()
    monitors = [SpectralMonitor(every_n_steps=3),
                MassiveActivationMonitor(every_n_steps=3, fit=False, plots=False),
                StabilityMonitor(every_n_steps=3)]
    cap = Capture()
    t = L.Trainer(max_steps=6, logger=cap, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                  callbacks=[losses, *monitors], accelerator="cpu")
    t.fit(model, TextDataModule(block_size=16, batch_size=4))
    return losses.losses, cap.metrics


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "hf-llama"])
def test_compiled_training_matches_eager_and_monitors_report(kind):
    from torch._dynamo.utils import counters
    eager, eager_logs = run(kind, compile=False)
    counters.clear()
    compiled, logs = run(kind, compile=True)
    assert counters["stats"]["unique_graphs"] > 0  # dynamo did compile the model
    assert len(compiled) == len(eager) == 6
    # same data, init and optimizer: fp32 kernels fused differently, nothing more
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=2e-3, atol=2e-3)
    for prefix in ("spectral/", "massive/", "stability/"):
        keys = sorted(k for k in eager_logs if k.startswith(prefix))
        assert keys, f"the eager run logged no {prefix} metrics"
        assert keys == sorted(k for k in logs if k.startswith(prefix)), prefix
        for k in keys:
            assert torch.isfinite(torch.tensor(logs[k])).all(), k
