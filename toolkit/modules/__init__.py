from .base import TrainModule, cross_entropy, hard_labels
from .classifier import Classifier, split_batch
from .hf import HFCausalLM, HFClassifier, build_hf_model
from .lm import LanguageModel

__all__ = ["Classifier", "HFCausalLM", "HFClassifier", "LanguageModel", "TrainModule",
           "build_hf_model", "cross_entropy", "hard_labels", "split_batch"]
