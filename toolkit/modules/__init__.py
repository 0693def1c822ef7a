from .base import TrainModule, cross_entropy, hard_labels
from .classifier import Classifier, split_batch
from .hf import HFCausalLM, HFClassifier, build_hf_model
from .lm import LanguageModel
from .single_index import SingleIndex

__all__ = ["Classifier", "HFCausalLM", "HFClassifier", "LanguageModel", "SingleIndex", "TrainModule",
           "build_hf_model", "cross_entropy", "hard_labels", "split_batch"]
