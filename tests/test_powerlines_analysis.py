"""The sweep's read-out of the best weight decay (scripts.papers.power_lines.optimum/analyze)
against curves whose optimum is known in closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest

from scripts.papers.power_lines import analyze, optimum

GRID = [0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]


@pytest.mark.parametrize("star", [0.07, 0.13, 0.5])
def test_optimum_recovers_the_vertex_of_a_log_parabola(star):
    losses = [2.0 + 0.03 * math.log(x / star) ** 2 for x in GRID]
    lam, bracketed = optimum(GRID, losses)
    assert bracketed and lam == pytest.approx(star, rel=1e-6)


def test_optimum_on_the_edge_is_flagged_not_extrapolated():
    lam, bracketed = optimum(GRID, [2.0 + x for x in GRID])
    assert (lam, bracketed) == (GRID[0], False)


def test_analyze_finds_a_linear_lambda_star_and_a_fixed_tau():
    # synthetic sweep obeying Power Lines: loss is a parabola in log tau with tau* = 0.3 for
    # every B, tau = B / (eta lambda D) = 1 / (eta lambda steps)
    lr, tokens, T = 0.01, 16 * 64 * 1200, 64
    runs = []
    for B in (16, 32, 64):
        steps = tokens // (B * T)
        for lam in GRID:
            tau = 1 / (lr * lam * steps)
            runs.append({"batch_size": B, "weight_decay": lam, "steps": steps,
                         "val_loss": 2 + 0.05 * math.log(tau / 0.3) ** 2})
    out = analyze(runs, lr)
    assert out["slope_log_lambda_vs_log_B"] == pytest.approx(1.0, abs=1e-6)
    for B, s in out["per_batch"].items():
        assert s["tau_star"] == pytest.approx(0.3, rel=1e-6)
        assert s["lambda_star"] == pytest.approx(B / (lr * 0.3 * tokens / T), rel=1e-6)
    assert np.isnan(out["per_batch"][16]["val_loss_no_decay"])  # no lambda = 0 run given
