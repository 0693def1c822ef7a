"""Every plug-in on small Hugging Face Llama, GPT-2 (Conv1D, tied head) and BERT configs: each
matrix optimizer trains; mixup / k-mixup mix a classifier's word embeddings; every monitor
reports every indicator for every layer."""
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

import optimizers
import regularizers
from toolkit import HFCausalLM, HFClassifier
from toolkit.modules import build_hf_model
from toolkit.monitors import MassiveActivationMonitor, SpectralMonitor, StabilityMonitor

from .test_conv1d_orientation import MATRIX

V = 40
ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                  bos_token_id=None, eos_token_id=None, pad_token_id=0),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=32,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0),
    "bert": dict(model_type="bert", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32, pad_token_id=0),
}
LM_TASK = {"llama": "causal_lm", "gpt2": "causal_lm", "bert": "masked_lm"}
LR = {"auon": 0.2, "hybrid_auon": 0.2}  # AuON's normalized step is smaller (optimizers/auon.py)


def ids(n=16, T=16, seed=0):
    return torch.randint(1, V, (n, T), generator=torch.Generator().manual_seed(seed))


def lm(arch):
    import transformers
    torch.manual_seed(0)
    if LM_TASK[arch] == "masked_lm":
        cfg = dict(ARCHS[arch])
        cfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), vocab_size=V, **cfg)
        return transformers.AutoModelForMaskedLM.from_config(cfg)
    return build_hf_model("causal_lm", ARCHS[arch], vocab_size=V)


@pytest.mark.parametrize("name", MATRIX)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_matrix_optimizer_trains(arch, name):
    model = lm(arch)
    groups = {g["kind"]: g for g in optimizers.param_groups(model)}
    hidden = dict(zip(groups["hidden"]["param_names"], groups["hidden"]["transposed"]))
    if arch == "gpt2":  # Conv1D weights flagged; the tied head counted once, as the embedding
        assert model.lm_head.weight is model.transformer.wte.weight
        assert "head" not in groups and all(hidden.values()) and len(hidden) == 8
    else:
        assert not any(hidden.values())
    opt = optimizers.build_optimizer(model, name, lr=LR.get(name, 0.02), adam_lr=1e-2,
                                     weight_decay=0.01)
    x = ids()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- mixing a classifier

class Recording(HFClassifier):
    """Keeps the token ids before embedding and the (mixed) batch training_step receives."""

    def on_after_batch_transfer(self, batch, dataloader_idx=0):
        if self.trainer.training:
            self.raw = batch[0]
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def training_step(self, batch, batch_idx):
        self.seen = [(self.raw, batch[0].detach().clone(), batch[1].detach().clone(),
                      self.model.get_input_embeddings().weight.detach().clone())]
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("mixer", ["mixup", "kmixup"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mixing_mixes_word_embeddings(arch, mixer):
    n = 8  # one class per example: a soft label names each example's partner and weight
    x, y = ids(n, 12), torch.arange(n)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=n)
    model = Recording(config=ARCHS[arch], vocab_size=V, num_classes=n, mix_embeddings=True,
                      optimizer="muon", lr=0.02, lr_decay="constant")
    cb = (regularizers.Mixup(alpha=1.0, seed=0) if mixer == "mixup"
          else regularizers.KMixup(k=4, alpha=1.0, seed=0))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    raw, mixed, soft, table = model.seen[0]
    assert mixed.is_floating_point() and mixed.shape == (n, 12, 32)
    lam = soft.max(-1).values
    assert (lam < 1).any(), "nothing was mixed"
    for i in range(n):  # independent check: lam * E[x_i] + (1 - lam) * E[x_j]
        w = soft[i]
        ref = sum(w[j] * table[raw[j]] for j in range(n) if w[j] > 0)
        torch.testing.assert_close(mixed[i], ref, atol=1e-5, rtol=1e-5)
    # the embedding lookup is part of the step's graph: the table gets its gradient and moves
    assert not torch.equal(model.model.get_input_embeddings().weight.detach(), table)


# ---------------------------------------------------------------- monitors

class Collect(Logger):
    name, version, experiment = "collect", 0, None

    def __init__(self):
        super().__init__()
        self.rows = {}

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("arch,task", [("llama", "lm"), ("gpt2", "lm"), ("llama", "classifier"),
                                       ("gpt2", "classifier"), ("bert", "classifier")])
def test_every_monitor_reports_every_indicator(arch, task, tmp_path):
    data = [(x, x if task == "lm" else x[0] % 3) for x in ids(8, 12)]
    if task == "lm":
        model = HFCausalLM(config=ARCHS[arch], vocab_size=V, lr_decay="constant")
    else:
        model = HFClassifier(config=ARCHS[arch], vocab_size=V, num_classes=3, lr_decay="constant")
    log = Collect()
    mons = [MassiveActivationMonitor(every_n_steps=2, out_dir=str(tmp_path), plots=False, fit=False),
            StabilityMonitor(every_n_steps=2), SpectralMonitor(every_n_steps=2, iters=10)]
    L.Trainer(max_steps=3, logger=log, callbacks=mons, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False
              ).fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    row = log.rows[2]
    hidden = optimizers.classify_parameters(model)["hidden"]
    want = [f"{ind}/layer{i}" for i in range(2) for ind in
            ("massive/ratio", "massive/top1", "stability/attn_z", "stability/attn_rms",
             "stability/mlp_rms", "stability/outlier_pct")]
    want += ["stability/logit_z"] + [f"spectral/{w}/{n}" for n, _ in hidden for w in ("W", "dW")]
    missing = [k for k in want if k not in row]
    assert not missing, missing
    assert all(torch.isfinite(torch.tensor(row[k])) for k in want)
    # 2 layers x (q, k, v, o, gate, up, down) / (c_attn, c_proj, c_fc, c_proj) / BERT's 6 + pooler
    assert len(hidden) == {"llama": 14, "gpt2": 8, "bert": 13}[arch]
