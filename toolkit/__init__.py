"""Paper ideas as plug-in components over one Lightning trainer."""
from . import strategies  # noqa: F401  (registers --trainer.strategy fsdp2)
from .data import ImageDataModule, TextDataModule
from .modules import Classifier, HFCausalLM, HFClassifier, LanguageModel

__all__ = ["Classifier", "HFCausalLM", "HFClassifier", "ImageDataModule", "LanguageModel",
           "TextDataModule"]
