"""trainer-overhead: the toolkit's fit vs a plain PyTorch loop on the quickstart model."""
from __future__ import annotations

import tempfile

import torch

from scripts.harness import Bench, case


def _setup(quick: bool):
    from toolkit import LanguageModel, TextDataModule
    steps = 20 if quick else 150
    dm = TextDataModule(block_size=128, batch_size=32, seed=0)
    make_model = lambda: LanguageModel(vocab_size=dm.vocab_size, block_size=128, n_layer=4,
                                       n_head=4, n_embd=128, optimizer="adamw", lr=1e-2,
                                       weight_decay=0.1, warmup_steps=10, lr_decay="cosine")
    return steps, dm, make_model


@case("trainer-overhead", target=1.10)
def trainer_overhead(quick: bool) -> Bench:
    """toolkit fit (logger, checkpoint, progress, LR monitor) vs plain torch loop, same steps."""
    from toolkit.cli import trainer
    from optimizers import build_optimizer, warmup_decay
    from toolkit.modules import cross_entropy
    steps, dm, make_model = _setup(quick)
    workdir = tempfile.mkdtemp(prefix="bench-trainer-")

    def toolkit_fit():
        torch.manual_seed(0)
        model = make_model()
        t = trainer(max_steps=steps, limit_val_batches=0, log_every_n_steps=25,
                    default_root_dir=workdir, enable_model_summary=False,
                    num_sanity_val_steps=0)
        t.fit(model, datamodule=dm)

    def plain_loop():
        torch.manual_seed(0)
        model = make_model()
        opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.1)
        sched = warmup_decay(opt, steps, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
        stream = dm.train_dataloader().dataset
        for step in range(steps):
            x, y = stream.batch(step)
            loss = cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return Bench({"toolkit-fit": toolkit_fit, "plain-torch-loop": plain_loop},
                 extra={"steps": steps, "model": "GPT 4x128, block 128, batch 32, AdamW"})
