"""HFCausalLM / HFClassifier: HF models from a config dict or a local directory, trained with the
toolkit's factory, schedules and data modules."""
import lightning as L
import pytest
import torch
import transformers

import toolkit
from toolkit import HFCausalLM, HFClassifier, TextDataModule
from toolkit.modules import build_hf_model

LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             bos_token_id=None, eos_token_id=None)
GPT2 = dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)


def fit(module, data, steps, **kw):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, **kw)
    trainer.fit(module, data)
    return trainer


def test_llama_from_config_takes_its_vocab_from_the_data_and_learns():
    torch.manual_seed(0)
    data = TextDataModule(block_size=32, batch_size=16, val_blocks=16)
    model = HFCausalLM(config=LLAMA, optimizer="muon", lr=0.02,
                       optimizer_kwargs={"adam_lr": 0.01}, warmup_steps=5)
    x, y = data.val_dataloader().dataset[0]
    fit(model, data, 40)
    assert isinstance(model.model, transformers.LlamaForCausalLM)
    assert model.hparams.vocab_size == data.vocab_size == model.model.config.vocab_size == 65
    assert model.model.config.num_key_value_heads == 2
    loss = torch.nn.functional.cross_entropy(model(x[None])[0], y).item()
    assert loss < 0.8 * torch.log(torch.tensor(65.0)).item()  # well below uniform (4.17)


def test_tuple_loss_equals_hf_shifted_loss():
    # (x, y) windows from TextDataModule vs HF's own labels loss on the (T+1)-token chunk.
    torch.manual_seed(0)
    model = HFCausalLM(config=GPT2, vocab_size=65).eval()
    chunk = torch.randint(0, 65, (3, 17))
    ours = model.lm_loss((chunk[:, :-1], chunk[:, 1:]))[0]
    theirs = model.model(input_ids=chunk, labels=chunk).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert model.lm_loss({"input_ids": chunk, "labels": chunk})[0].item() == pytest.approx(theirs.item())


def test_pretrained_directory_and_checkpoint_rebuild_the_same_model(tmp_path):
    torch.manual_seed(0)
    ref = build_hf_model("causal_lm", GPT2, vocab_size=65)
    ref.save_pretrained(tmp_path / "gpt2")
    loaded = HFCausalLM(pretrained=str(tmp_path / "gpt2")).eval()
    x = torch.randint(0, 65, (2, 12))
    torch.testing.assert_close(loaded(x), ref.eval()(input_ids=x).logits)
    # a config-built module (vocab from the data) reloads from its Lightning checkpoint
    module = HFCausalLM(config=LLAMA, lr=1e-3)
    data = TextDataModule(block_size=16, batch_size=4)
    trainer = fit(module, data, 2)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    again = HFCausalLM.load_from_checkpoint(tmp_path / "m.ckpt").eval()
    torch.testing.assert_close(again(x), module.eval()(x))


def test_classifier_from_config_pools_and_learns():
    torch.manual_seed(0)
    n, T = 256, 12
    x = torch.randint(3, 40, (n, T))
    y = torch.randint(0, 3, (n,))
    x[:, 4] = y  # the label is written in token 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                         shuffle=True)
    model = HFClassifier(config={**GPT2, "vocab_size": 40}, num_classes=3, lr=5e-3)
    assert isinstance(model.model, transformers.GPT2ForSequenceClassification)
    fit(model, loader, 100)
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).float().mean() > 0.9


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        HFCausalLM()
    with pytest.raises(ValueError, match="exactly one of"):
        HFCausalLM(config=LLAMA, pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="not a transformers model type"):
        HFCausalLM(config={"model_type": "lama", "vocab_size": 10})
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HFCausalLM(pretrained=str(tmp_path / "nowhere"))
    small = HFCausalLM(config={**LLAMA, "vocab_size": 20})
    with pytest.raises(ValueError, match="vocab_size: 65"):
        fit(small, TextDataModule(block_size=16, batch_size=4), 1)
    assert toolkit.HFClassifier is HFClassifier
