"""Massive activations (Sun et al. 2024) and their emergence law (Gallego-Feliciano et al. 2025):
refit a run, the architecture grid and its regression, the law's calibration, pretrained MiniLM."""
