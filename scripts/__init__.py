"""Benchmarks, sweeps and plots; run each as ``python -m scripts.<name>`` from the repository root."""
