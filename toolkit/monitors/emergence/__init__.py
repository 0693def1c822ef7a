"""The emergence law of massive activations (Gallego-Feliciano et al. 2025, "Hidden Dynamics of
Massive Activations in Transformer Training"): the law and its fit (core.py), the block
bootstrap of its predictions (boot.py), tables and plots (report.py). Pure numpy/scipy."""
from .core import (LOWER, PARAMS, UPPER, EmergenceFit, emergence_law, fit_emergence, fit_history,
                   grid_profile, peak_step, r_squared)
from .report import by_layer, plot_history, summary_table

__all__ = ["LOWER", "PARAMS", "UPPER", "EmergenceFit", "by_layer", "emergence_law", "fit_emergence",
           "fit_history", "grid_profile", "peak_step", "plot_history", "r_squared", "summary_table"]
