"""Private MFLD trajectories (regularizers.dp_trajectories, toolkit.modules.trajectories): the
per-person gradients against autograd, the per-person bound and the step's sensitivity measured
black-box, the two adjacencies, and epsilon against the analytic Gaussian mechanism."""
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from regularizers.dp_trajectories import kernel_bound, privacy_report, step_noise
from regularizers.dp_trajectories.core import (BANDWIDTHS, clipped_kernel_sum, clipped_sum, person_gradients,
                                               person_sensitivity)


def kernel(z, x):
    d2 = (z[:, None] - x[None]).square().sum(-1)
    return sum(h * h * torch.exp(-d2 / (2 * h * h)) for h in BANDWIDTHS)


def test_person_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 2, generator=g, dtype=torch.float64)
    x = torch.randn(5, 2, generator=g, dtype=torch.float64)
    a = person_gradients(x, z)
    for j in range(5):
        zz = z.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(kernel(zz, x[j:j + 1]).sum(), zz)
        torch.testing.assert_close(a[j], -grad)


@pytest.mark.parametrize("clip_frac", [1.0, 0.2])
def test_fused_clipped_sum_matches_the_per_person_loop(clip_frac):
    """The step's fused sum (no (n, N, d) tensor) equals clipping each person's gradient in a
    loop, with the clip idle (the recipe) and binding for most people."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(9, 2, generator=g, dtype=torch.float64)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    clip = clip_frac * kernel_bound(9)
    loop = sum(a * min(1.0, clip / a.norm().item()) for a in person_gradients(x, z))
    torch.testing.assert_close(clipped_kernel_sum(x, z, clip), loop)


def test_per_person_bound_and_step_sensitivity_black_box():
    """The kernel bound holds for the worst placements (a person at distance h from every
    particle), and removing one person moves a snapshot's clipped sum by at most C."""
    N = 16
    bound = kernel_bound(N)
    z = torch.zeros(N, 2, dtype=torch.float64)  # all particles at one spot: the worst case
    worst = 0.0
    for r in np.linspace(0.05, 3, 60):
        x = torch.tensor([[r, 0.0]], dtype=torch.float64)
        worst = max(worst, person_gradients(x, z).flatten(1).norm(dim=1).item())
    assert worst <= bound and worst > 0.6 * bound
    g = torch.Generator().manual_seed(1)
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64) * 0.5
    clip = 0.3 * bound  # binds for most people
    full = clipped_sum(person_gradients(x, z), clip)
    moves = [(full - clipped_sum(person_gradients(torch.cat([x[:j], x[j + 1:]]), z), clip)).norm().item()
             for j in range(40)]
    assert max(moves) <= clip + 1e-9 and max(moves) > 0.5 * clip


def test_whole_trajectory_person_needs_sqrt_s_more_noise():
    assert person_sensitivity(2.0, "trajectory", 5) == pytest.approx(2.0 * math.sqrt(5))
    assert person_sensitivity(2.0, "point", 5) == 2.0
    s_point = step_noise(2.0, 1e-6, 50, 1.0, "point", 5)
    s_traj = step_noise(2.0, 1e-6, 50, 1.0, "trajectory", 5)
    assert s_point[0] == s_traj[0] and s_traj[1] == pytest.approx(math.sqrt(5) * s_point[1])
    with pytest.raises(ValueError, match="adjacency"):
        person_sensitivity(1.0, "household", 5)


def analytic_epsilon(z: float, delta: float) -> float:
    """Balle & Wang 2018 exact Gaussian mechanism; `steps` full-batch releases at multiplier
    sigma compose to one at sigma / sqrt(steps)."""
    f = lambda e: norm.cdf(0.5 / z - e * z) - math.exp(e) * norm.cdf(-0.5 / z - e * z) - delta
    return brentq(f, 0.0, 200.0)


@pytest.mark.parametrize("target,steps", [(1.0, 150), (4.0, 150), (8.0, 40)])
def test_epsilon_matches_analytic_gaussian(target, steps):
    sigma, _ = step_noise(target, 1e-6, steps, 1.0, "point", 5)
    r = privacy_report(sigma, steps, 1e-6, 1.0, "point", 5, 10_000)
    exact = analytic_epsilon(sigma / math.sqrt(steps), 1e-6)
    assert exact <= r["epsilon"] * (1 + 1e-3) and r["epsilon"] == pytest.approx(exact, rel=0.02)
    assert r["epsilon"] <= target


@pytest.mark.slow
def test_module_trains_counts_steps_and_reports(tmp_path):
    from toolkit.cli import trainer
    from toolkit.data.sde import SDESnapshots
    from toolkit.modules.trajectories import PrivateTrajectories
    dm = SDESnapshots(people_per_time=100, n_eval=50)
    model = PrivateTrajectories(n_particles=16, epsilon=2.0, delta=1e-5)
    t = trainer(max_steps=3, max_epochs=1, val_check_interval=3, limit_val_batches=1,
                num_sanity_val_steps=0, default_root_dir=str(tmp_path), enable_progress_bar=False,
                enable_checkpointing=False)
    t.fit(model, dm)
    assert int(model.steps_taken) == 3 and t.global_step == 3
    rep = json.loads(next(tmp_path.rglob("dp_report.json")).read_text())
    assert rep["steps"] == 3 and rep["epsilon"] <= 2.0 and rep["epsilon"] > 1.9
    assert "val/w2_held_out" in t.callback_metrics
    with pytest.raises(ValueError, match="delta"):
        t2 = trainer(max_steps=1, max_epochs=1, default_root_dir=str(tmp_path), enable_progress_bar=False)
        t2.fit(PrivateTrajectories(n_particles=4, delta=0.1), SDESnapshots(people_per_time=10, n_eval=10))


@pytest.mark.slow
def test_one_run_audit_catches_missing_noise_but_not_the_generator():
    """Steinke et al.'s one-run audit with white-box canaries (scripts/papers/mfld_trajectories/audit.py): the real
    generator's claimed eps = 1 stands, the same run without gradient noise is refuted."""
    from scripts.papers.mfld_trajectories.audit import run
    assert run(1.0, broken=False)["eps_lower_bound"] < 1.0
    assert run(1.0, broken=True)["eps_lower_bound"] > 1.0
