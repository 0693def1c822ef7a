"""The private Lightning attributes the toolkit uses (toolkit/lightning_internals.py), run
against a real Trainer: these fail first, and loudly, when Lightning moves them."""
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from toolkit.lightning_internals import LightningChanged, batches_processed, wrap_train_dataloader


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((len(batch[0]), batches_processed(self.trainer)))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=4)


class Wrap(L.Callback):
    """Replaces the module's loader by one with batch size 3, as DPSGD swaps in its own."""

    def __init__(self):
        self.calls = 0

    def setup(self, trainer, pl_module, stage):
        wrap_train_dataloader(trainer, self.wrap)
        wrap_train_dataloader(trainer, self.wrap)  # idempotent: wrapped once, not twice

    def wrap(self, loader):
        self.calls += 1
        return DataLoader(loader.dataset, batch_size=3)


def test_wrapped_loader_is_the_one_trained_on_and_progress_counts_batches():
    module, wrap = Tiny(), Wrap()
    L.Trainer(max_epochs=2, callbacks=[wrap], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)
    assert wrap.calls == 1
    assert [n for n, _ in module.seen] == [3] * 8
    # batches processed before each training_step: this epoch's count restarts, the total does not
    assert [p for _, p in module.seen] == [(i % 4, i) for i in range(8)]


def test_a_moved_attribute_names_lightning_and_the_fix():
    class Moved:
        fit_loop = object()
    with pytest.raises(LightningChanged, match="lightning .* no longer has .*_data_source"):
        wrap_train_dataloader(Moved(), lambda loader: loader)
    with pytest.raises(LightningChanged, match="batch_progress.*lightning<2.7"):
        batches_processed(Moved())
