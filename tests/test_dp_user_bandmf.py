"""User-level privacy with BandMF noise (issue 26: "works with BandMF noise as well"):
the cyclic Poisson schedule then runs over users, so a user takes part only at its own
partition's steps, and there moves the released sums by at most C (its clipped average),
the matrix-mechanism release C S by at most ||c|| C per participation; measured black-box
as ``test_dp_bandmf_callback`` measures one example."""
import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from regularizers import DPSGD

from .test_dp_bandmf_callback import Released, check_within_bound
from .test_dp_user_callback import Owned
from .test_dp_user_level import dp_accounting_els

warnings.filterwarnings("ignore", message="DPSGD.seed")
C = 0.5


def users_at_the_end(seed=0):
    """7 users; the last (id 6) owns 9 aligned examples 1000 times larger, the last rows
    of the dataset, so removing it keeps every other user's id and partition."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([0, 1, 2, 0, 3, 4, 5, 1, 3, 5, 2, 4] + [6] * 9)
    x = torch.randn(len(owner), 6, generator=g)
    x[owner == 6] = x[owner == 6][0] * 1e3
    return x, torch.arange(len(owner)) % 3, owner


def released(x, y, owner, steps, bands, **kw):
    rec = Released()
    users = len(owner.unique())
    dp = DPSGD(**{"noise_multiplier": 0.01, "delta": 1e-3, "max_grad_norm": C, "seed": 7,
                  "accountant": "rdp", "noise": "bandmf", "bands": bands, "privacy_unit": "user",
                  "user_key": 2, "examples_per_user": 4, **kw})
    module = Owned(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3)))
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)
    L.Trainer(callbacks=[dp, rec], max_steps=steps, logger=False, accelerator="cpu",
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
              ).fit(module, DataLoader(TensorDataset(x, y, owner), batch_size=users // bands))
    return torch.stack(rec.sums), dp


@pytest.mark.parametrize("strategy", ["bsr", "optimized"])
def test_a_user_moves_the_bandmf_release_by_at_most_the_column_norm(strategy):
    steps, bands = 6, 2
    x, y, owner = users_at_the_end()
    torch.manual_seed(0)
    a, dp = released(x, y, owner, steps, bands, strategy=strategy)
    torch.manual_seed(0)
    keep = owner != 6
    b, _ = released(x[keep], y[keep], owner[keep], steps, bands, strategy=strategy)
    assert dp.report["num_users"] == 7 and dp.report["sample_rate"] == 1.0
    assert "users" in dp.report["analysis"] and "banded" in dp.report["analysis"]
    part = next(k for k, p in enumerate(dp.bandmf.sampler.parts) if 6 in p.tolist())
    check_within_bound(a - b, part, dp, bands, steps)  # <= C per step, <= ||c|| C per block


def test_els_with_bandmf_is_accounted_per_cycle_then_by_group_privacy():
    x, y, owner = users_at_the_end()
    steps, bands, k = 6, 2, 3
    _, dp = released(x, y, owner, steps, bands, user_sampling="els", examples_per_user=k,
                     noise_multiplier=2.0)
    kept = len(dp.data.loader.dataset)
    assert kept == int(torch.bincount(owner).clamp(max=k).sum())
    q = (7 // bands) / (kept // bands)
    sigma_eff = 2.0 / dp.report["column_norm"]
    assert dp.report["epsilon"] == pytest.approx(
        dp_accounting_els(sigma_eff, q, math.ceil(steps / bands), k, 1e-3), rel=1e-3)
