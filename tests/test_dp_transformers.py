"""DP-SGD on transformers: per-example gradients of Hugging Face GPT-2 (Conv1D, tied head,
broadcast position index), Llama (RMSNorm, rotary, GQA, tied), BERT (token-type and position
tables, tied MLM head) and a peft LoRA model equal a naive per-example loop, and the DPSGD
callback trains them with sensitivity <= C."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regularizers.dp import PerSampleGradients


warnings.filterwarnings("ignore", message="DPSGD.seed")
V, T = 40, 6


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=16,
                                        tie_word_embeddings=True))


def lora(base=gpt2):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(base(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                             lora_dropout=0.0, fan_in_fan_out=True))


class Logits(nn.Module):
    """input ids -> logits; dropout off, so a batch of one and a batch agree exactly."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        for m in hf.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0

    def forward(self, x):
        return self.hf(input_ids=x).logits


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def bert():
    from transformers import BertConfig, BertForMaskedLM
    return BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=16))


MODELS = {"gpt2": gpt2, "llama": llama, "bert": bert, "gpt2-lora": lora}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_example_gradients_equal_a_naive_loop(name):
    torch.manual_seed(0)
    model = Logits(MODELS[name]()).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (4, T), generator=g), torch.randint(0, V, (4, T), generator=g)
    eng = PerSampleGradients(model)
    params = eng.params
    with eng.capture(batch_size=len(x)):
        lm_loss(model(x), y).backward()
    pieces = eng.pieces()
    for i in range(len(x)):
        ref = torch.autograd.grad(lm_loss(model(x[i:i + 1]), y[i:i + 1]), params, allow_unused=True)
        e = torch.zeros(len(x), dtype=torch.float64)
        e[i] = 1
        for p, r in zip(params, ref):
            r = torch.zeros_like(p) if r is None else r
            got = pieces[p].weighted_sum(e) if p in pieces else torch.zeros_like(p)
            torch.testing.assert_close(got, r, rtol=1e-6, atol=1e-9)
        n2 = sum(pieces[p].norm2()[i] for p in pieces)
        torch.testing.assert_close(n2, sum(r.square().sum() for r in ref if r is not None),
                                   rtol=1e-6, atol=1e-9)


def test_lora_does_per_example_work_for_the_adapters_only():
    torch.manual_seed(0)
    model = Logits(lora())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    eng = PerSampleGradients(model)
    x = torch.randint(0, V, (3, T))
    with eng.capture(batch_size=3):
        lm_loss(model(x), x).backward()
    captured = {eng._names[m] for m, calls in eng._calls.items() if calls}
    assert captured and all("lora_" in n for n in captured), captured
    assert {id(p) for p in eng.pieces()} == {id(p) for p in eng.params}
    assert len(eng.params) == len(trainable)


def test_dpsgd_trains_hf_gpt2_within_c():
    """The whole callback (probe included) on an HF model in a user's LightningModule:
    the released update's add/remove-one sensitivity stays <= C."""
    from tests.test_dp_adversarial import C, Plain, sensitivity

    def make():
        torch.manual_seed(0)
        return Plain(Logits(gpt2()))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, V, (6, T), generator=g), torch.randint(0, V, (6, T), generator=g)
    assert sensitivity(make, x, y) <= C * (1 + 1e-4)
