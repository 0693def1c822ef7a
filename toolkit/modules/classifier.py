"""Classifier: an MLP or small CNN trained with cross-entropy on index or soft targets."""
from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import nn

from ..models import MLP, GNLinear, SmallCNN, TanhCNN
from ..batch_keys import input_target_keys
from .base import ClassifierSteps, TrainModule

ARCHS = ("cnn", "mlp", "tanh_cnn", "gn_linear")


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a pair or a dict with image/label-like keys."""
    if isinstance(batch, dict):
        xk, yk = input_target_keys(batch, "Classifier")
        return batch[xk], batch[yk]
    x, y = batch
    return x, y


class Classifier(ClassifierSteps, TrainModule):
    def __init__(self, arch: str = "cnn", num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, width: int = 32, norm: str = "batch",
                 activation: str = "relu", hidden: list[int] | None = None, **optim: Any):
        super().__init__(**optim)  # optimizer, lr, ...: OptimizerConfig (CLASSIFIER_DEFAULTS)
        if arch == "cnn":
            self.model: nn.Module = SmallCNN(in_channels, num_classes, width, norm,
                                             activation=activation, image_size=image_size)
        elif arch == "tanh_cnn":  # Papernot et al. 2021's DP-SGD CNN (28x28 inputs)
            self.model = TanhCNN(in_channels, num_classes, activation)
        elif arch == "gn_linear":  # linear model on feature maps (ScatterNet, Tramer & Boneh)
            self.model = GNLinear(in_channels, num_classes, image_size)
        elif arch == "mlp":
            self.model = MLP(in_channels * image_size ** 2, tuple(hidden or (256, 256)),
                             num_classes, activation)
        else:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
        metrics = lambda: torchmetrics.MetricCollection({
            "acc": torchmetrics.Accuracy("multiclass", num_classes=num_classes),
            "loss": torchmetrics.MeanMetric()})
        self.val_metrics, self.test_metrics = metrics(), metrics()
        # one example: Lightning's model summary then reports real FLOPs (it printed 0)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)

    def configure_model(self) -> None:
        """--trainer.strategy fsdp2: these models are small, so one FSDP unit (the whole
        model) shards every weight across ranks; BatchNorm statistics stay per rank, as
        under DDP without SyncBatchNorm."""
        from ..strategies import shard_blocks
        if shard_blocks(self.model, [], self.device_mesh):
            self.example_input_array = None  # a rank-0-only summary forward would hang

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def classify(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = split_batch(batch)
        return self(x), y
