"""Under DDP each rank mixes its own batch, and Langevin noise keeps replicas identical."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # several processes (the fast lane skips them)

ROOT = Path(__file__).resolve().parent.parent


def test_ddp_ranks_mix_their_own_batches_and_share_noise(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_mixing_script.py"), str(tmp_path)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for rec in (r0, r1):
        assert len(rec["raw"]) == 4
        for raw, mixed in zip(rec["raw"], rec["mixed"]):
            assert len(raw) == 16
            # every row is a mix of two examples, both from the rank's own batch
            assert all(len(parents) == 2 and set(parents) <= set(raw) for parents in mixed)
            assert set().union(*map(set, mixed)) == set(raw)
    for a, b in zip(r0["raw"], r1["raw"]):
        assert not set(a) & set(b)  # the ranks saw different data
    for k in r0["params"]:  # same noise on both ranks: replicas stay identical
        torch.testing.assert_close(r0["params"][k], r1["params"][k], rtol=0, atol=0)
