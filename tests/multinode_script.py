"""One "node" of a localhost multi-node run (tests/test_multinode.py starts one per node with
MASTER_ADDR, MASTER_PORT, NODE_RANK and WORLD_SIZE set, as a user does on each machine; with
``--devices 2`` Lightning starts the node's second process itself).

For each plug-in in ``--plugins`` it trains to ``--stop`` of ``TOTAL`` steps (resuming from
``--resume/<plugin>/last.ckpt`` when given) with the same global batch on any world size,
saves ``<out>/<plugin>/step=3.ckpt`` every 3 steps and ``last.ckpt``, and writes ``<out>/<plugin>/ranks<global rank>.json``:
the ranks each seed/owner decision used."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import regularizers
from optimizers import newton_schulz
from toolkit import Classifier, ImageDataModule, LanguageModel, TextDataModule
from tests.test_resume import StopAt
from toolkit.cli import trainer

TOTAL, GLOBAL_BATCH = 9, 8
NS_FP32 = {"ns_dtype": "float32"}  # 2 ranks' averaged gradients differ in the last fp32 bit
KWARGS = {"muon": NS_FP32, "muonpp": NS_FP32, "hyperp": NS_FP32, "hybrid_auon": NS_FP32,
          "auon": {}, "adamw": {}}




class Ranks(L.Callback):
    """Records which rank each rank-derived decision took, at the first training batch."""

    def __init__(self, out: Path):
        self.out, self.done = out, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.done:
            return
        self.done = True
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        stream = getattr(getattr(loader, "dataset", None), "rank", None)
        mixers = [c for c in trainer.callbacks if isinstance(c, regularizers.KMixup)]
        info = {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank,
                "node_rank": trainer.node_rank, "world_size": trainer.world_size,
                "ns_rank": newton_schulz.distributed_world()[0],
                "data_rank": getattr(sampler, "rank", stream),
                "kmixup_rank": mixers[0]._rank if mixers else None,
                "adds_dp_noise": trainer.is_global_zero,
                "cluster": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
                "env": {k: os.environ.get(k) for k in ("NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")}}
        (self.out / f"ranks{trainer.global_rank}.json").write_text(json.dumps(info))


def build(plugin: str, world: int, data_root: Path):
    batch = GLOBAL_BATCH // world
    if plugin == "dpsgd":
        model = Classifier(arch="mlp", hidden=[16], optimizer="sgd", lr=0.1, warmup_steps=0,
                           lr_decay="constant")
        dm = ImageDataModule(root=str(data_root), val_size=100, batch_size=batch * 4)
        cbs = [regularizers.DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=1.0, seed=3)]
        return model, dm, cbs
    if plugin == "kmixup":
        model = Classifier(arch="mlp", hidden=[16], optimizer="muon", warmup_steps=0,
                           lr_decay="constant", optimizer_kwargs=NS_FP32)
        dm = ImageDataModule(root=str(data_root), val_size=100, batch_size=batch)
        return model, dm, [regularizers.KMixup(k=1, alpha=1.0, num_classes=10, seed=1)]
    model = LanguageModel(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16,
                          optimizer=plugin, optimizer_kwargs=KWARGS[plugin], warmup_steps=0,
                          lr_decay="constant")
    return model, TextDataModule(block_size=16, batch_size=batch), []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plugins", required=True)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--stop", type=int, default=TOTAL)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--strategy", default="ddp", help="with more than one process: ddp or fsdp2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data_root = Path(a.data)  # a fake MNIST folder the test wrote
    world = a.nodes * a.devices
    for plugin in a.plugins.split(","):
        out = Path(a.out) / plugin
        out.mkdir(parents=True, exist_ok=True)
        L.seed_everything(0)
        model, dm, cbs = build(plugin, world, data_root)
        cbs += [ModelCheckpoint(dirpath=out, filename="{step}", save_last=True,
                                save_top_k=-1, every_n_train_steps=3), StopAt(a.stop), Ranks(out)]
        t = trainer(max_steps=TOTAL, accelerator="cpu", devices=a.devices, num_nodes=a.nodes,
                    strategy=a.strategy if world > 1 else "auto", callbacks=cbs, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0, default_root_dir=out)
        ckpt = Path(a.resume) / plugin / "last.ckpt" if a.resume else None
        t.fit(model, datamodule=dm, ckpt_path=ckpt)
        assert t.global_step == a.stop, (plugin, t.global_step)


if __name__ == "__main__":
    main()
