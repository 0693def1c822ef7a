"""Every registered optimizer builds from a model through the factory and reduces a loss."""
import pytest
import torch

import optimizers
from toolkit.models import SmallCNN

# Learning rates that suit each family on this toy problem; anything new uses DEFAULT_LR.
LRS = {"sgd": 0.05, "adamw": 1e-2, "adam": 1e-2, "muon": 0.05, "hyperp": 0.05, "muonpp": 0.05,
       "auon": 0.3, "hybrid_auon": 0.3}
DEFAULT_LR = 1e-2


@pytest.mark.parametrize("name", sorted(optimizers.OPTIMIZERS))
def test_registered_optimizer_reduces_loss(name):
    torch.manual_seed(0)
    model = SmallCNN(1, 4, width=8, norm="group", image_size=8)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 4, (32,))
    opt = optimizers.build_optimizer(model, name, lr=LRS.get(name, DEFAULT_LR), weight_decay=0.01)
    assert isinstance(opt, torch.optim.Optimizer)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(15):
        opt.step(closure)
    assert closure().item() < 0.9 * first
