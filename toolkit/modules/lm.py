"""LanguageModel: next-token training of the toolkit's GPT."""
from __future__ import annotations

from typing import Any

import torch
import torchmetrics

from ..models import GPT, GPTConfig
from ..strategies import shard_blocks
from .base import TrainModule, cross_entropy, log_lm_loss


class LanguageModel(TrainModule):
    """GPT language model. ``vocab_size=None`` takes it from the data module at setup.

    ``moe`` (a dict of :class:`toolkit.models.MoEConfig` fields) replaces every block's MLP by a
    mixture of experts; training then minimizes ``cross-entropy + aux_loss_weight * aux`` (the
    load-balancing loss summed over layers) and logs ``train/aux_loss``. Validation and test
    losses stay the cross-entropy alone, comparable with a dense model's.
    """

    def __init__(self, vocab_size: int | None = None, block_size: int = 128, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, dropout: float = 0.0, bias: bool = False,
                 depth_mup: bool = False, optimizer: str = "adamw", lr: float | None = None,
                 weight_decay: float = 0.1, optimizer_kwargs: dict[str, Any] | None = None,
                 warmup_steps: int = 0, lr_decay: str = "cosine", min_lr_ratio: float = 0.1,
                 compile: bool = False, moe: dict[str, Any] | None = None):
        super().__init__(optimizer, lr, weight_decay, optimizer_kwargs, warmup_steps, lr_decay,
                         min_lr_ratio)
        GPTConfig(n_head=n_head, n_embd=n_embd, moe=moe)  # bad moe settings fail here, named
        self.save_hyperparameters()
        self.model: GPT | None = None
        if vocab_size is not None:
            self._build(vocab_size)
        self.val_loss = torchmetrics.MeanMetric()
        self.test_loss = torchmetrics.MeanMetric()
        # one sequence: Lightning's model summary then reports real FLOPs (it printed 0)
        self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)

    def _build(self, vocab_size: int) -> None:
        hp = self.hparams
        self.model = GPT(GPTConfig(vocab_size, hp.block_size, hp.n_layer, hp.n_head, hp.n_embd,
                                   hp.dropout, hp.bias, hp.depth_mup, hp.get("moe")))
        if hp.compile:
            self.model.compile()

    def configure_model(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_vocab = getattr(dm, "vocab_size", None)
        if self.model is None:
            if data_vocab is None:
                raise ValueError("LanguageModel needs vocab_size: set model.vocab_size or use a "
                                 "data module with a vocab_size attribute")
            self.hparams.vocab_size = data_vocab  # so the checkpoint rebuilds the same model
            self._build(data_vocab)
        elif data_vocab is not None and data_vocab > self.hparams.vocab_size:
            raise ValueError(f"data has {data_vocab} symbols but model.vocab_size is "
                             f"{self.hparams.vocab_size}; set model.vocab_size: {data_vocab}")
        if shard_blocks(self.model, self.model.blocks, self.device_mesh):  # --trainer.strategy fsdp2
            self.example_input_array = None  # a rank-0-only summary forward would wait on the others

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _step(self, batch, metric: torchmetrics.MeanMetric | None, stage: str):
        x, y = batch
        loss = cross_entropy(self(x), y)
        log_lm_loss(self, loss, x.shape[0], metric, stage)
        aux = self.model.aux_loss()
        if aux is not None and stage == "train":
            self.log("train/aux_loss", aux.detach(), batch_size=x.shape[0])
            weight = self.model.cfg.moe.aux_loss_weight
            if weight:
                loss = loss + weight * aux
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, None, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, self.val_loss, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, self.test_loss, "test")

    def _log_ppl(self, metric: torchmetrics.MeanMetric, stage: str) -> None:
        # Perplexity is exp of the mean token cross-entropy; logged from the same metric.
        self.log(f"{stage}/ppl", torch.exp(metric.compute()), sync_dist=False)

    def on_validation_epoch_end(self):
        self._log_ppl(self.val_loss, "val")

    def on_test_epoch_end(self):
        self._log_ppl(self.test_loss, "test")

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.hparams.block_size:])[:, -1] / temperature
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
