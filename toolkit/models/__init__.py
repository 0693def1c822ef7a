from .gpt import GPT, GPTConfig
from .vision import MLP, SmallCNN

__all__ = ["GPT", "GPTConfig", "MLP", "SmallCNN"]
