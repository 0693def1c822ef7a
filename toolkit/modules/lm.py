"""LanguageModel: next-token training of the toolkit's GPT."""
from __future__ import annotations

from typing import Any

import torch
import torchmetrics

from ..models import GPT, GPTConfig
from ..models.unit_ops import cross_entropy as unit_cross_entropy
from ..strategies import shard_blocks
from .base import LMSteps, TrainModule, cross_entropy
from .optim_config import LM_DEFAULTS


class LanguageModel(LMSteps, TrainModule):
    """GPT language model. ``vocab_size=None`` takes it from the data module at setup.
    The optimizer settings (``optimizer``, ``lr``, ...) are :class:`OptimizerConfig`'s, with
    weight decay 0.1 and a cosine decay to 0.1 of the peak lr by default.

    ``moe`` (a dict of :class:`toolkit.models.MoEConfig` fields) replaces every block's MLP by a
    mixture of experts; training then minimizes ``cross-entropy + aux_loss_weight * aux`` (the
    load-balancing loss summed over layers) and logs ``train/aux_loss``. Validation and test
    losses stay the cross-entropy alone, comparable with a dense model's.

    ``parametrization`` ("sp", "mup", "umup") and u-muP's multipliers are GPTConfig's
    (:mod:`toolkit.models.parametrization`); under "umup" the training loss is the unit-scaled
    cross-entropy (the same value, a unit-scaled gradient) and the optimizer factory gives each
    tensor u-muP's learning rate. ``fp8`` simulates FP8 matmuls in every linear layer.
    """

    optim_defaults = LM_DEFAULTS

    def __init__(self, vocab_size: int | None = None, block_size: int = 128, n_layer: int = 4,
                 n_head: int = 4, n_embd: int = 128, dropout: float = 0.0, bias: bool = False,
                 depth_mup: bool = False, compile: bool = False,
                 moe: dict[str, Any] | None = None,
                 parametrization: str = "sp", residual_mult: float = 1.0,
                 residual_attn_ratio: float = 1.0, attn_softmax_mult: float = 1.0,
                 ffn_act_mult: float = 1.0, output_mult: float = 1.0, mup_base_width: int = 64,
                 fp8: bool = False, **optim: Any):
        super().__init__(**optim)  # optimizer, lr, ...: OptimizerConfig (LM_DEFAULTS)
        # bad moe or parametrization settings fail here, named
        GPTConfig(n_head=n_head, n_embd=n_embd, moe=moe, depth_mup=depth_mup,
                  **self._param_kwargs(locals()))
        self.model: GPT | None = None
        if vocab_size is not None:
            self._build(vocab_size)
        self.val_loss = torchmetrics.MeanMetric()
        self.test_loss = torchmetrics.MeanMetric()
        # one sequence: Lightning's model summary then reports real FLOPs (it printed 0)
        self.example_input_array = torch.zeros(1, block_size, dtype=torch.long)

    @staticmethod
    def _param_kwargs(hp) -> dict[str, Any]:
        """The parametrization fields of GPTConfig present in ``hp`` (a checkpoint from before
        them has none: it rebuilds as sp, as it was trained)."""
        keys = ("parametrization", "residual_mult", "residual_attn_ratio", "attn_softmax_mult",
                "ffn_act_mult", "output_mult", "mup_base_width", "fp8")
        return {k: hp[k] for k in keys if k in hp}

    def _build(self, vocab_size: int) -> None:
        hp = self.hparams
        self.model = GPT(GPTConfig(vocab_size, hp.block_size, hp.n_layer, hp.n_head, hp.n_embd,
                                   hp.dropout, hp.bias, hp.depth_mup, hp.get("moe"),
                                   **self._param_kwargs(hp)))
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

    def lm_loss(self, batch) -> tuple[torch.Tensor, int]:
        x, y = batch[0], batch[1]  # a third field (the owner, for user-level DP) is not read
        loss = unit_cross_entropy if self.model.cfg.parametrization == "umup" else cross_entropy
        return loss(self(x), y), x.shape[0]

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)  # logs the cross-entropy as train/loss
        aux = self.model.aux_loss()
        if aux is None:
            return loss
        self.log("train/aux_loss", aux.detach(), batch_size=batch[0].shape[0])
        weight = self.model.cfg.moe.aux_loss_weight
        return loss + weight * aux if weight else loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.hparams.block_size:])[:, -1] / temperature
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
