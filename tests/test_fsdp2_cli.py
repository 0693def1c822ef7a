"""``--trainer.strategy fsdp2`` through the CLI (2 CPU processes, gloo): Muon on the sharded GPT
trains like one process with the same global batch, and resumes from its sharded
(torch.distributed.checkpoint) ``last.ckpt`` on the same, fewer (2 -> 1) or more (1 -> 2) ranks."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

pytestmark = pytest.mark.slow  # several processes (the fast lane skips them)

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8
# constant lr without warmup: a 4-step run then a resume to 8 follows the 8-step run's schedule;
# fp32 Newton-Schulz: 2 ranks' reduce-scattered gradients differ from 1 process's in the last bit
MUON = ["--model.lr_decay", "constant", "--model.warmup_steps", "0",
        "--model.optimizer_kwargs", "{adam_lr: 0.01, betas: [0.9, 0.99], ns_dtype: float32}"]


def fit(cwd: Path, devices: int, steps: int, strategy: str | None = "fsdp2", ckpt: Path | None = None,
        optimizer: str = "muon") -> Path:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "toolkit", "fit", "--config", str(ROOT / "recipes" / "muon_lm.yaml"),
           "--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2",
           "--model.block_size", "32", "--data.block_size", "32",
           "--data.batch_size", str(GLOBAL_BATCH // devices), "--model.optimizer", optimizer,
           "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
           "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), *MUON]
    if strategy:
        cmd += ["--trainer.strategy", strategy]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((cwd / "runs" / "muon_lm").glob("version_*"), key=lambda p: int(p.name[8:]))
    return runs[-1] / "checkpoints" / "last.ckpt"


def load(ckpt: Path) -> dict:
    """Weights and optimizer state (by parameter name) of a checkpoint: a file, or a sharded
    folder made whole."""
    if ckpt.is_dir():
        whole = ckpt.parent / "whole.pt"
        dcp_to_torch_save(ckpt, whole)
        state = torch.load(whole, weights_only=False)
        opt = state["optimizer_0"]["state"]  # keyed by parameter name already
        return {"model": state["state_dict"], "opt": opt,
                "step": torch.load(ckpt / "meta.pt", weights_only=False)["global_step"]}
    state = torch.load(ckpt, weights_only=False)
    opt = state["optimizer_states"][0]
    by_name = {n: opt["state"][i] for g in opt["param_groups"]
               for i, n in zip(g["params"], g["param_names"]) if i in opt["state"]}
    return {"model": state["state_dict"], "opt": by_name, "step": state["global_step"]}


def assert_same(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    assert a["opt"].keys() == b["opt"].keys()
    for name, st in a["opt"].items():
        assert st.keys() == b["opt"][name].keys(), name
        for key, v in st.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(v, b["opt"][name][key], rtol=1e-4, atol=1e-5,
                                           msg=f"{name}.{key}")
            else:
                assert v == b["opt"][name][key], f"{name}.{key}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """8 steps on 2 fsdp2 ranks, in one go."""
    return load(fit(tmp_path_factory.mktemp("straight"), devices=2, steps=8))


def test_fsdp2_trains_like_one_process(straight, tmp_path):
    one = load(fit(tmp_path / "one", devices=1, steps=8, strategy=None))
    # weights and every parameter's optimizer state equal one process's (which holds all of it)
    assert_same(straight, one)
    assert len(one["opt"]) == len(one["model"])
    init = load(fit(tmp_path / "zero", devices=1, steps=1, strategy=None))["model"]
    for k in ("model.blocks.0.mlp.c_fc.weight", "model.lm_head.weight"):
        assert not torch.allclose(one["model"][k], init[k], atol=1e-4), k  # it trained


def test_fsdp2_resumes_on_same_fewer_and_more_ranks(straight, tmp_path):
    half2 = fit(tmp_path / "a", devices=2, steps=4)
    assert half2.is_dir()  # sharded: each rank wrote its own shards
    assert_same(load(fit(tmp_path / "a", devices=2, steps=8, ckpt=half2)), straight)  # 2 -> 2
    assert_same(load(fit(tmp_path / "b", devices=1, steps=8, ckpt=half2)), straight)  # 2 -> 1
    half1 = fit(tmp_path / "c", devices=1, steps=4)
    assert_same(load(fit(tmp_path / "d", devices=2, steps=8, ckpt=half1)), straight)  # 1 -> 2


def fit_recipe(cwd: Path, recipe: str, devices: int, extra: list) -> Path:
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "toolkit", "fit", "--config", str(ROOT / "recipes" / f"{recipe}.yaml"),
           "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
           "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
           "--model.lr_decay", "constant", "--model.warmup_steps", "0", "--model.optimizer", "muon",
           *extra] + (["--trainer.strategy", "fsdp2"] if devices > 1 else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((cwd / "runs" / recipe).glob("version_*"), key=lambda p: int(p.name[8:]))
    return runs[-1] / "checkpoints" / "last.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["hf_llama_muon", "mnist_cnn"])
def test_hf_and_classifier_modules_shard_and_train_like_one_process(recipe, tmp_path, request):
    """HFCausalLM shards each decoder layer, Classifier its whole (small) model; 2 fsdp2 ranks
    with half the batch each equal one process (GroupNorm: BatchNorm statistics are per rank)."""
    kw = "{adam_lr: 0.01, ns_dtype: float32}"
    if recipe == "mnist_cnn":
        root = request.getfixturevalue("mnist_root")  # ../shared/data or $TOOLKIT_DATA
        extra = lambda d: ["--data.root", str(root),  # noqa: E731
                           "--model.norm", "group", "--data.batch_size", str(GLOBAL_BATCH // d),
                           "--model.optimizer_kwargs", kw]
    else:
        extra = lambda d: ["--data.block_size", "32", "--data.batch_size", str(GLOBAL_BATCH // d),  # noqa: E731
                           "--model.optimizer_kwargs", kw]
    two = fit_recipe(tmp_path / "two", recipe, 2, extra(2))
    assert two.is_dir()  # a sharded (torch.distributed.checkpoint) checkpoint
    assert_same(load(two), load(fit_recipe(tmp_path / "one", recipe, 1, extra(1))))
