"""Two CPU processes under strategy=ddp (gloo) == one process with the same global batch."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run_cli(cwd: Path, devices: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "toolkit", "fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"),
           "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2",
           "--model.block_size", "32", "--data.block_size", "32", "--data.batch_size", str(batch),
           "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
           "--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    last = cwd / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True)["state_dict"]


def test_two_process_ddp_matches_one_process(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_cli(tmp_path / "one", devices=1, batch=8)
    two = run_cli(tmp_path / "two", devices=2, batch=4)
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # and the run really trained: weights moved from their init
    assert not torch.allclose(one["model.lm_head.weight"], torch.zeros_like(one["model.lm_head.weight"]))
