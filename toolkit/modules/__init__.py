from .base import TrainModule, cross_entropy, hard_labels
from .classifier import Classifier, split_batch
from .lm import LanguageModel

__all__ = ["Classifier", "LanguageModel", "TrainModule", "cross_entropy", "hard_labels",
           "split_batch"]
