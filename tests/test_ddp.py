"""Two CPU processes under strategy=ddp (gloo) == one process with the same global batch,
through the CLI: the AdamW quickstart, and Muon (Newton-Schulz split across the ranks)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # several processes (the fast lane skips them)

ROOT = Path(__file__).resolve().parent.parent


def run_cli(cwd: Path, devices: int, batch: int, recipe: str = "quickstart", extra=()) -> dict:
    cmd = [sys.executable, "-m", "toolkit", "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"),
           "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2",
           "--model.block_size", "32", "--data.block_size", "32", "--data.batch_size", str(batch),
           "--trainer.max_steps", "5", "--trainer.limit_val_batches", "0",
           "--trainer.accelerator", "cpu", "--trainer.devices", str(devices)]
    if devices > 1:
        cmd += ["--trainer.strategy", "ddp"]
    cmd += list(extra)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, timeout=600)
    last = cwd / "runs" / recipe / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(last, weights_only=True)  # what a DDP run writes loads without code


# The averaged gradients of 2 ranks differ from 1 process's in the last fp32 bit, and bf16
# Newton-Schulz turns that into bf16-ulp update differences (~2e-4 after 5 steps); fp32
# Newton-Schulz keeps the Muon comparison at fp32 tolerance. The split itself is bitwise in
# bf16 (tests/test_optimizers_ddp.py).
MUON_FP32_NS = ("--model.optimizer_kwargs", "{adam_lr: 0.01, betas: [0.9, 0.99], ns_dtype: float32}")


@pytest.mark.parametrize("recipe, extra", [("quickstart", ()), ("muon_lm", MUON_FP32_NS)])
def test_two_process_ddp_matches_one_process(tmp_path, recipe, extra):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ckpt_one = run_cli(tmp_path / "one", devices=1, batch=8, recipe=recipe, extra=extra)
    ckpt_two = run_cli(tmp_path / "two", devices=2, batch=4, recipe=recipe, extra=extra)
    one, two = ckpt_one["state_dict"], ckpt_two["state_dict"]
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # rank 0's checkpoint holds the whole optimizer state (every momentum buffer), as one
    # process has it, so a resume from it is exact
    s1, s2 = (c["optimizer_states"][0]["state"] for c in (ckpt_one, ckpt_two))
    assert s1.keys() == s2.keys() and len(s1) == len(one)
    for i in s1:
        for name, v in s1[i].items():
            if torch.is_tensor(v):
                torch.testing.assert_close(s2[i][name], v, rtol=1e-4, atol=1e-5)
    # and the run really trained: weights moved from their init
    assert not torch.allclose(one["model.lm_head.weight"], torch.zeros_like(one["model.lm_head.weight"]))
