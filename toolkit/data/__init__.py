from .idx import DataError, read_idx
from .images import ImageDataModule, balanced_subset
from .samplers import ResumableSampler
from .text import TextDataModule, load_text

__all__ = ["DataError", "ImageDataModule", "ResumableSampler", "TextDataModule",
           "balanced_subset", "load_text", "read_idx"]
