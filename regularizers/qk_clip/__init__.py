"""QK-clip (Kimi K2's MuonClip cap on attention logits, arXiv 2507.20534)."""
from .callback import QKClip
from .core import (attention_modules, clip_, clip_forward_, clip_measured_, qk_layout,
                   watch_forward)

__all__ = ["QKClip", "attention_modules", "clip_", "clip_forward_", "clip_measured_",
           "qk_layout", "watch_forward"]
