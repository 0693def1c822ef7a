"""Benchmarks, sweeps and plots; run each as ``python -m scripts.<name>`` from the repository root.

Tools (shared by every paper):

- ``bench`` (``harness``, cases in ``bench_cases/``): named speed cases, ratios against a
  reference in the same run; ``--out docs/results`` keeps a result for docs/benchmarks.md.
- ``results``: renders the recipe table, the recipe headers and the benchmark table from
  ``docs/results``; ``--check`` lists what disagrees.
- ``sweep_io``, ``lm_run``: what the sweep scripts share (threads, resumable results, one short
  char-GPT run); ``lr_sweep``: lr x width (x depth) for any optimizer.
- ``compare``, ``compare_optimizers``, ``compare_monitors``: runs side by side (tables, plots).

Paper experiments (one or more modules per paper, named after it):

- Muon family / HyperP / MoE / weight decay: ``moe_rms``, ``powerlines_sweep``, ``layerwise_widths``.
- Massive activations: ``fit_massive``, ``emergence_grid``, ``emergence_regression``,
  ``emergence_calibration``, ``minilm_massive``.
- k-mixup: ``kmixup_toy``. Ghosts of Softmax: ``ghosts_lr_spike``, ``ghosts_onset``.
- DP-SGD: ``dp_tradeoff``, ``dp_audit``. RCO: ``rco_knapsack``, ``rco_mixed_precision``.
"""
