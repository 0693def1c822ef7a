"""Banded matrix-factorization noise (Choquette-Choo et al., NeurIPS 2023): which number of
bands, and BandMF vs DP-SGD on softmax regression over MNIST pixels."""
