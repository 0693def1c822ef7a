"""Regularizers: pure functional cores plus thin Lightning callbacks."""
from .dp import DPSGD

__all__: list[str] = ["DPSGD"]
