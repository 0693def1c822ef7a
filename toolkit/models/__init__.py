from .gpt import GPT, GPTConfig
from .moe import MoEConfig, MoEMLP
from .vision import MLP, GNLinear, SmallCNN, TanhCNN

__all__ = ["GPT", "GPTConfig", "GNLinear", "MLP", "MoEConfig", "MoEMLP", "SmallCNN", "TanhCNN"]
