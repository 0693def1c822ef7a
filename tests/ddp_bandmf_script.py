"""DPSGD(noise="bandmf") under DDP (gloo, CPU) or in one process; saves the final weights.

    python -m tests.ddp_bandmf_script --devices 2 --batch 4 --out w.pt
"""
import argparse
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regularizers import DPSGD


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    x = torch.randn(48, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(48) % 3
    dp = DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=0.5, seed=3, noise="bandmf",
               bands=3, accountant="rdp")
    m = Net()
    t = L.Trainer(callbacks=[dp], max_steps=7, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                  devices=a.devices, strategy="ddp" if a.devices > 1 else "auto")
    t.fit(m, DataLoader(TensorDataset(x, y), batch_size=a.batch))
    if t.is_global_zero:
        torch.save({"weights": [p.detach() for p in m.parameters()], "ledger": dp.ledger,
                    "released": dp.bandmf.released,
                    "noise_ranks": int(dp.bandmf.noise is not None)}, a.out)
    if a.devices > 1:  # every rank but 0 kept no noise state
        flag = torch.tensor([int(dp.bandmf.noise is not None)])
        torch.distributed.all_reduce(flag)
        if t.is_global_zero:
            torch.save({**torch.load(a.out, weights_only=True), "noise_ranks": int(flag)}, a.out)


if __name__ == "__main__":
    main()
