"""Private synthetic trajectories by mean-field Langevin dynamics (Gu, Chien & Greenewald, arXiv
2506.12203): the pure MFLD step with per-person clipped, noised data gradients (core.py) and
its privacy accounting (accounting.py) through ``regularizers.dp.accounting``."""
from .accounting import privacy_report, step_noise
from .core import generate, kernel_bound, mfld_gradient, mfld_step, simulate, w2

__all__ = ["generate", "kernel_bound", "mfld_gradient", "mfld_step", "privacy_report", "simulate", "step_noise", "w2"]
