"""Small image classifiers for 28x28 inputs (MNIST and its drop-in relatives)."""
from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose 'group', 'batch' or 'none'")


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (256, 256),
                 num_classes: int = 10, activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), _act(activation)]
            in_features = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Two conv stages (conv-norm-act x2, max-pool) then a two-layer classifier.

    ``norm="group"`` keeps examples independent (needed for per-example gradients in
    DP-SGD); ``norm="batch"`` is the usual non-private choice.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
                 norm: str = "group", groups: int = 8, activation: str = "relu",
                 image_size: int = 28, hidden: int = 128):
        super().__init__()
        w1, w2 = width, 2 * width
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout, groups),
                                   _act(activation)]
        self.features = nn.Sequential(*block(in_channels, w1), *block(w1, w1), nn.MaxPool2d(2),
                                      *block(w1, w2), *block(w2, w2), nn.MaxPool2d(2),
                                      nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(w2 * (image_size // 4) ** 2, hidden), _act(activation))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.fc(self.features(x)))


class TanhCNN(nn.Module):
    """The DP-SGD baseline CNN of Papernot et al. 2021 ("Tempered sigmoid activations for
    deep learning with differential privacy", Table 1, MNIST; Opacus's MNIST example):
    conv16 8x8/2 - tanh - maxpool 2/1 - conv32 4x4/2 - tanh - maxpool 2/1 - fc32 - tanh - fc.
    No normalization layer, so examples stay independent; 26k parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, activation: str = "tanh"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 8, 2, padding=3), _act(activation), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), _act(activation), nn.MaxPool2d(2, 1), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32), _act(activation))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class GNLinear(nn.Module):
    """GroupNorm over feature channels, then one linear layer: the "ScatterNet + linear"
    model of Tramer & Boneh 2021 (Sec. 3) for (C, H, W) feature maps. GroupNorm
    normalizes each example on its own, so it costs no privacy."""

    def __init__(self, in_channels: int = 81, num_classes: int = 10, image_size: int = 7,
                 groups: int = 27):
        super().__init__()
        self.norm = nn.GroupNorm(groups, in_channels)
        self.flat = nn.Flatten()
        self.head = nn.Linear(in_channels * image_size ** 2, num_classes)

    def forward(self, x):
        return self.head(self.flat(self.norm(x)))
