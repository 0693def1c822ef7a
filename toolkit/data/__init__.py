from .idx import DataError, read_idx
from .images import ImageDataModule, balanced_subset
from .samplers import ResumableSampler
from .single_index import SingleIndexDataModule
from .speakers import SpeakerDataModule, speaker_turns
from .text import TextDataModule, load_text

__all__ = ["DataError", "ImageDataModule", "ResumableSampler", "SingleIndexDataModule",
           "SpeakerDataModule", "TextDataModule", "balanced_subset", "load_text", "read_idx", "speaker_turns"]
