from .gpt import GPT, GPTConfig
from .vision import MLP, GNLinear, SmallCNN, TanhCNN

__all__ = ["GPT", "GPTConfig", "GNLinear", "MLP", "SmallCNN", "TanhCNN"]
