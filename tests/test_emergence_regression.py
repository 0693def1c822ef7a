"""Architecture -> emergence-law regression (scripts/papers/massive_activations/regression.py) and the grid
runner (scripts/papers/massive_activations/grid.py): ridge and leave-one-configuration-out against
independent least-squares computations, the fractional design, and the CLI overrides."""
from __future__ import annotations

import collections
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from scripts.papers.massive_activations import grid as grid_mod
from scripts.papers.massive_activations import regression as reg

ROOT = Path(__file__).resolve().parent.parent




def ridge_by_augmentation(X, y, alpha):
    """Ridge as ordinary least squares on rows [Z; sqrt(alpha) I] (standardized Z, centred y)."""
    mu, sd = X.mean(0), X.std(0)
    Z = (X - mu) / sd
    A = np.vstack([Z, np.sqrt(alpha) * np.eye(X.shape[1])])
    b = np.r_[y - y.mean(), np.zeros(X.shape[1])]
    w = np.linalg.lstsq(A, b, rcond=None)[0]
    return lambda Xn: y.mean() + ((Xn - mu) / sd) @ w


def test_ridge_matches_augmented_least_squares_and_ols_at_zero_penalty():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 5)) * [1, 3, 0.5, 2, 1] + [0, 4, 1, -2, 0.5], rng.normal(size=30)
    Xn = rng.normal(size=(7, 5))
    for alpha in (0.3, 1.0, 10.0):
        np.testing.assert_allclose(reg.ridge_fit(X, y, alpha)(Xn),
                                   ridge_by_augmentation(X, y, alpha)(Xn), rtol=1e-10)
    ols = np.linalg.lstsq(np.c_[np.ones(30), X], y, rcond=None)[0]
    np.testing.assert_allclose(reg.ridge_fit(X, y, 0.0)(Xn), np.c_[np.ones(7), Xn] @ ols,
                               rtol=1e-9)


def test_leave_one_group_out_matches_explicit_loop():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(24, 5)), rng.normal(size=24)
    groups = np.repeat(np.arange(8), 3)
    pred, base = reg.loo_by_group(X, y, groups, 1.0)
    for g in range(8):
        keep = groups != g
        np.testing.assert_allclose(pred[~keep], ridge_by_augmentation(X[keep], y[keep], 1.0)(
            X[~keep]), rtol=1e-10)
        np.testing.assert_allclose(base[~keep], y[keep].mean())


def synthetic_records(log_target, seed):
    rng = np.random.default_rng(seed)
    recs = []
    for cfg in grid_mod.grid():
        for layer in range(cfg["depth"]):
            x = reg.features(cfg, layer)
            K = float(np.exp(log_target(x) + rng.normal(0, 0.05)))
            recs.append(dict(cfg, layer=layer, ratio_end=K, steady_ok=True, timing_ok=False,
                             half_ok=False, half_rise=500.0,
                             fit={"K": K, "peak_step": 1000.0}))
    return recs


def test_loo_recovers_a_log_linear_law_and_not_noise():
    law = lambda x: 1.0 + 0.4 * x[0] - 0.15 * x[1] + 0.2 * x[2] + 0.5 * x[3] + 0.6 * x[4]
    res = reg.regress(synthetic_records(law, 0))
    s = res["steady state K (identifiable fits)"]
    assert s["n"] == 2 * 2 * (2 + 3 + 4) and s["configs"] == 12
    assert s["loo_r2_log"] > 0.9 and s["spearman"] > 0.9
    assert s["median_rel_err"] < 0.1 < s["baseline_median_rel_err"]
    # per-unit effects recovered (ridge shrinks a little)
    eff = s["log_effect_per_unit"]
    assert eff["log10 lr"] == pytest.approx(0.5, rel=0.2)
    assert eff["depth"] == pytest.approx(-0.15, rel=0.3)
    # no timing identified anywhere: no regression, said so
    assert "no regression" in res["peak step (peak inside the window)"]["note"]
    noise = reg.regress(synthetic_records(lambda x: 0.0, 1))
    assert noise["steady state K (identifiable fits)"]["loo_r2_log"] < 0.2


def test_grid_is_a_balanced_twelve_point_design():
    g = grid_mod.grid()
    assert len(g) == 12 and len({c["name"] for c in g}) == 12
    for factor in ("width", "depth", "lr"):
        counts = collections.Counter((c[factor], c["heads"]) for c in g)
        per_level = collections.Counter(c[factor] for c in g)
        for (level, heads), n in counts.items():
            assert n == per_level[level] / 2, (factor, level, heads)


@pytest.mark.slow  # a second Python process
def test_grid_command_overrides_the_recipe(tmp_path):
    cfg = grid_mod.grid()[5]
    cmd = grid_mod.command(cfg, 123, 25, tmp_path) + ["--print_config"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    conf = yaml.safe_load(out.stdout)
    m = conf["model"]["init_args"]
    assert (m["n_embd"], m["n_layer"], m["n_head"], m["lr"]) == (
        cfg["width"], cfg["depth"], cfg["heads"], cfg["lr"])
    assert conf["trainer"]["max_steps"] == 123 and m["lr_decay"] == "constant"
    # --print_config lists the default callbacks too; the recipe's monitor is there once
    cbs = [c for c in conf["trainer"]["callbacks"] if c["class_path"].endswith("MassiveActivationMonitor")]
    assert len(cbs) == 1 and cbs[0]["init_args"]["every_n_steps"] == 25
    assert cbs[0]["init_args"]["probe"] == "fixed"


def test_half_rise_step_matches_root_of_the_law():
    from scipy.optimize import brentq

    from toolkit.monitors.emergence import EmergenceFit, emergence_law
    p = (10.0, 0.05, 1e-3, 1.0, 3.0)  # rising over the whole window (peak at ~8,500)
    fit = EmergenceFit(*p, r2=1.0, n_points=61, t_max=3000.0,
                       samples=np.array([p, (12.0, *p[1:])]))
    r0, top = emergence_law(0.0, *p), emergence_law(3000.0, *p)
    root = brentq(lambda t: emergence_law(t, *p) - (r0 + top) / 2, 0, 3000)
    point, (lo, hi) = reg.half_rise(fit)
    assert point == pytest.approx(root, abs=3000 / 399)
    # A only scales the rise: the half-rise step of the second sample is the same.
    assert lo == pytest.approx(point) and hi == pytest.approx(point)
