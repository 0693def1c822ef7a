"""One short char-GPT training run on the embedded Tiny Shakespeare, for the sweep scripts
(``scripts.papers.power_lines``, ``scripts.papers.layerwise_wd``): the toolkit's LanguageModel and
TextDataModule under a bare Lightning Trainer (no logger, no checkpoints), validation once at
the end on a fixed set of windows. Returns the final validation loss and the trained module.
"""
from __future__ import annotations

import time
from typing import Any

import lightning as L


def train_char_lm(*, steps: int, batch_size: int, block_size: int = 64, n_layer: int = 2,
                  n_embd: int = 64, lr: float = 0.01, weight_decay: float = 0.0,
                  optimizer_kwargs: dict[str, Any] | None = None, warmup_frac: float = 0.05,
                  val_blocks: int = 512, seed: int = 0) -> tuple[float, Any, float]:
    """(final val loss, trained LanguageModel, wall seconds) of one run; the schedule is the
    quickstart's (linear warmup over ``warmup_frac`` of the steps, cosine to 0.1x)."""
    from toolkit import LanguageModel, TextDataModule
    L.seed_everything(seed, verbose=False)
    model = LanguageModel(block_size=block_size, n_layer=n_layer, n_head=max(1, n_embd // 32),
                          n_embd=n_embd, optimizer="adamw", lr=lr, weight_decay=weight_decay,
                          optimizer_kwargs={"betas": [0.9, 0.99], **(optimizer_kwargs or {})},
                          warmup_steps=round(warmup_frac * steps), lr_decay="cosine",
                          min_lr_ratio=0.1)
    data = TextDataModule(block_size=block_size, batch_size=batch_size, val_blocks=val_blocks,
                          seed=seed)
    val_loss, wall = fit_quietly(model, data, steps)
    return val_loss, model, wall


def fit_quietly(model, data, steps: int, limit_val_batches: int | float | None = None
                ) -> tuple[float, float]:
    """(final val loss, wall seconds) of ``steps`` training steps under a bare CPU Trainer (no
    logger, checkpoints or progress bar), validating once at the end."""
    trainer = L.Trainer(max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None,
                        limit_val_batches=limit_val_batches, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    t0 = time.perf_counter()
    trainer.fit(model, data)
    return float(trainer.callback_metrics["val/loss"]), time.perf_counter() - t0
