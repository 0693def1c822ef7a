"""One convention each: dict-batch key names, finding the head, the step controls' home, and
data modules that read their data in setup(), not at construction."""
import pytest
import torch
from torch import nn

import optimizers
import regularizers
from regularizers.ghosts.callback import batch_inputs
from toolkit import HFClassifier, TextDataModule
from toolkit.batch_keys import INPUT_KEYS, TARGET_KEYS
from toolkit.data import text as text_data
from toolkit.models import GPT, GPTConfig
from toolkit.modules.classifier import split_batch
from toolkit.monitors.layers import find_head


@pytest.mark.parametrize("xk,yk", [("x", "y"), ("image", "label"), ("input_ids", "labels"),
                                   ("pixel_values", "targets"), ("inputs", "target")])
def test_every_reader_of_a_dict_batch_takes_the_same_keys(xk, yk):
    x, y = torch.randn(4, 3), torch.arange(4)
    batch = {xk: x, yk: y, "attention_mask": torch.ones(4, 3)}
    readers = {
        "Classifier": split_batch(batch),
        "HFClassifier": HFClassifier._split(None, batch)[:2],
        "KMixup": regularizers.KMixup(k=2, num_classes=4)._split(batch)[:2],
    }
    for name, (got_x, got_y) in readers.items():
        assert got_x is x and got_y is y, name
    assert batch_inputs(batch) is x  # RadiusControl's forward
    with pytest.raises(KeyError, match="one of"):
        split_batch({"features": x, "y": y})
    assert set(INPUT_KEYS).isdisjoint(TARGET_KEYS)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _factory_heads(model):
    groups = optimizers.classify_parameters(model)
    return {n.rsplit(".", 1)[0] for n, _ in groups["head"]}


def test_the_factory_and_the_monitors_find_the_same_head():
    gpt = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=1, n_embd=8))
    assert _factory_heads(gpt) == {find_head(gpt)[0]} == {"lm_head"}
    import transformers
    hf = transformers.AutoModelForSequenceClassification.from_config(
        transformers.GPT2Config(n_embd=8, n_layer=1, n_head=1, vocab_size=11, pad_token_id=0))
    assert _factory_heads(hf) == {find_head(hf)[0]} == {"score"}
    # no conventional name: the factory falls back to the last Linear, the monitor does not guess
    assert _factory_heads(_Plain()) == {"body.2"} and find_head(_Plain()) is None


def test_step_controls_live_in_one_place_and_old_paths_still_import():
    from regularizers import step_control
    from regularizers.lr_spike import LRSpike
    from regularizers.step_hooks import StepHookCallback
    assert LRSpike is step_control.LRSpike is regularizers.LRSpike
    assert step_control.RadiusControl is regularizers.RadiusControl
    for cls in (step_control.LRSpike, step_control.RadiusControl):
        assert issubclass(cls, StepHookCallback)
    from optimizers.factory import HEAD_NAMES, _head_modules  # noqa: F401  (old paths)


def test_text_data_is_read_in_setup_not_at_construction(monkeypatch):
    reads = []
    real = text_data.load_text
    monkeypatch.setattr(text_data, "load_text", lambda *a, **k: reads.append(1) or real(*a, **k))
    dm = TextDataModule(block_size=8, batch_size=2)
    assert reads == []
    dm.setup("fit")
    dm.setup("validate")
    assert reads == [1] and dm.vocab_size == 65
