"""Regularizers: pure functional cores plus thin Lightning callbacks."""
__all__: list[str] = []
