"""Run by tests/test_kmixup_ddp.py under 2 CPU ranks (strategy=ddp): KMixup + LangevinNoise."""
import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from regularizers import KMixup, LangevinNoise

N = 64


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(N, 4)
        self.raw, self.mixed = [], []

    def on_train_batch_start(self, batch, batch_idx):  # before the mixing wrapper runs
        self.raw.append(sorted(batch[0].nonzero()[:, 1].tolist()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.mixed.append([row.nonzero()[:, 0].tolist() for row in x])
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    out = sys.argv[1]
    L.seed_everything(0)
    x, y = torch.eye(N), torch.arange(N) % 4  # row i is example i: mixed rows name their parents
    model = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False,
                        callbacks=[KMixup(k=4, num_classes=4), LangevinNoise(temperature=1e-3)])
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    torch.save({"raw": model.raw, "mixed": model.mixed, "params": model.state_dict()},
               f"{out}/rank{trainer.global_rank}.pt")
