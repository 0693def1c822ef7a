"""Several nodes on localhost, launched as a user launches them: the same command on each
"node" with MASTER_ADDR, MASTER_PORT, NODE_RANK and WORLD_SIZE set (Lightning's
``num_nodes``; gloo on CPU). 2 nodes x 1 process train like one process with the same global
batch; a run moved from 2 nodes to 1 and back continues like the uninterrupted run (every
matrix optimizer, AdamW, DP-SGD with its ledger); on 2 nodes x 2 processes every decision
derived from a rank uses the global rank. tests/multinode_script.py is the per-node program."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import write_fake_mnist

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZERS = ["adamw", "muon", "muonpp", "hyperp", "auon", "hybrid_auon"]
PLUGINS = OPTIMIZERS + ["dpsgd"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, data: Path, plugins, nodes=1, devices=1, stop=9, resume: Path | None = None,
           slurm: bool = False, strategy: str = "ddp"):
    """Run tests/multinode_script.py once per node, concurrently, and wait for all; ``slurm``:
    with the variables ``srun`` sets for one task per node instead of NODE_RANK/WORLD_SIZE."""
    cmd = [sys.executable, "-m", "tests.multinode_script", "--plugins", ",".join(plugins),
           "--nodes", str(nodes), "--devices", str(devices), "--stop", str(stop),
           "--out", str(out), "--data", str(data), "--strategy", strategy] + \
        (["--resume", str(resume)] if resume else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = str(_port())
    procs = []
    for node in range(nodes):
        node_env = env if nodes * devices == 1 else {
            **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "NODE_RANK": str(node),
            "WORLD_SIZE": str(nodes * devices)}
        if slurm:
            node_env = {**env, "MASTER_PORT": port, "SLURM_JOB_NAME": "multinode",
                        "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1",
                        "SLURM_NNODES": str(nodes), "SLURM_NTASKS": str(nodes),
                        "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(node),
                        "SLURM_LOCALID": "0", "SLURM_NODEID": str(node)}
        procs.append(subprocess.Popen(cmd, cwd=out.parent, env=node_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return out


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_close_ckpt(a: dict, b: dict, what: str) -> None:
    assert a["global_step"] == b["global_step"], what
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=f"{what}: {k}")
    # rank 0's optimizer state is the whole state (momenta of every matrix), as one process has it
    oa, ob = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert oa.keys() == ob.keys(), what
    for i in oa:
        for key, v in oa[i].items():
            if torch.is_tensor(v):
                torch.testing.assert_close(ob[i][key], v, rtol=1e-4, atol=1e-5, msg=f"{what}: {i}.{key}")


def dp_state(ckpt: dict) -> dict:
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("DPSGD")]
    return ckpt["callbacks"][key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multinode")
    data = write_fake_mnist(root / "mnist", n_train=600, n_test=100)
    straight = launch(root / "straight", data, PLUGINS)  # 1 process, 9 steps
    two = launch(root / "two", data, PLUGINS, nodes=2, stop=3)
    one = launch(root / "one", data, PLUGINS, stop=6, resume=two)  # 2 nodes -> 1 process
    back = launch(root / "back", data, PLUGINS, nodes=2, stop=9, resume=one)  # -> 2 nodes
    return {"straight": straight, "two": two, "one": one, "back": back, "data": data, "root": root}


@pytest.mark.slow
@pytest.mark.parametrize("plugin", PLUGINS)
def test_two_nodes_train_like_one_process_and_resume_across_node_counts(runs, plugin):
    ref = {s: load(runs["straight"] / plugin / f"step={s}.ckpt") for s in (3, 6, 9)}
    assert_close_ckpt(ref[3], load(runs["two"] / plugin / "last.ckpt"), "2 nodes, steps 0-3")
    if plugin == "dpsgd":
        # every resume draws fresh noise and batches (issue 23: released noise is never
        # replayed), so a resumed DP run is a different run, not the straight one continued
        for s, run in ((6, "one"), (9, "back")):
            got = load(runs[run] / plugin / "last.ckpt")
            assert got["global_step"] == s
            assert any(not torch.equal(got["state_dict"][k], v)
                       for k, v in ref[s]["state_dict"].items()), f"{run} replayed the noise"
    else:
        assert_close_ckpt(ref[6], load(runs["one"] / plugin / "last.ckpt"), "then 1 process, 3-6")
        assert_close_ckpt(ref[9], load(runs["back"] / plugin / "last.ckpt"), "then 2 nodes, 6-9")
    # the 2-node run really ran on two ranks (one per node)
    ranks = [json.loads((runs["two"] / plugin / f"ranks{r}.json").read_text()) for r in (0, 1)]
    assert [(r["node_rank"], r["local_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 0, 2)]


@pytest.mark.slow
def test_dp_sgd_ledger_continues_across_node_counts_with_fresh_noise(runs):
    straight = load(runs["straight"] / "dpsgd" / "step=9.ckpt")
    moved = load(runs["back"] / "dpsgd" / "last.ckpt")
    a, b = dp_state(straight), dp_state(moved)
    assert a.keys() == b.keys()
    assert straight["global_step"] == moved["global_step"] == 9
    # the privacy ledger: the same steps charged at the same (sigma, q), over 1 fit straight
    # and 3 fits (2 nodes, then 1, then 2) resumed; each fit drew fresh noise (test above)
    assert (a["fits"], b["fits"]) == (1, 3)
    for k in a:
        if k != "fits":
            assert a[k] == b[k], k
    assert sum(seg[-1] for seg in a["ledger"]) == 9  # (sigma, q, steps) segments: all 9 charged


@pytest.mark.slow
def test_two_nodes_of_two_processes_use_global_ranks(runs):
    root = runs["root"]
    four = launch(root / "four", runs["data"], ["muon", "kmixup"], nodes=2, devices=2, stop=3)
    ranks = sorted((json.loads(p.read_text()) for p in (four / "muon").glob("ranks*.json")),
                   key=lambda r: r["global_rank"])
    assert [(r["node_rank"], r["local_rank"]) for r in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in ranks:  # every rank-derived seed or owner takes the global rank, not the local one
        assert r["ns_rank"] == r["data_rank"] == r["global_rank"], r
        assert r["adds_dp_noise"] == (r["global_rank"] == 0), r
    mix = sorted((json.loads(p.read_text()) for p in (four / "kmixup").glob("ranks*.json")),
                 key=lambda r: r["global_rank"])
    assert [r["kmixup_rank"] for r in mix] == [0, 1, 2, 3]
    # 4 ranks x batch 2 == 1 process x batch 8: Muon's split of Newton-Schulz over 4 owners
    assert_close_ckpt(load(runs["straight"] / "muon" / "step=3.ckpt"),
                      load(four / "muon" / "last.ckpt"), "2 nodes x 2 processes")


@pytest.mark.slow
def test_two_nodes_launched_as_srun_tasks_train_like_one_process(runs):
    # what `srun` gives each task (docs/distributed.md's sbatch example): Lightning's
    # SLURMEnvironment takes the ranks and the address from the SLURM_* variables
    out = launch(runs["root"] / "srun", runs["data"], ["muon"], nodes=2, stop=3, slurm=True)
    ranks = [json.loads((out / "muon" / f"ranks{r}.json").read_text()) for r in (0, 1)]
    assert {r["cluster"] for r in ranks} == {"SLURMEnvironment"}
    assert [(r["global_rank"], r["node_rank"]) for r in ranks] == [(0, 0), (1, 1)]
    assert_close_ckpt(load(runs["straight"] / "muon" / "step=3.ckpt"),
                      load(out / "muon" / "last.ckpt"), "2 srun tasks")


@pytest.mark.slow
def test_two_nodes_under_fsdp2_train_like_one_process(runs):
    from tests.test_fsdp2_cli import assert_same
    from tests.test_fsdp2_cli import load as load_any  # a file, or a sharded checkpoint folder
    out = launch(runs["root"] / "fsdp2", runs["data"], ["adamw", "muon"], nodes=2, stop=3,
                 strategy="fsdp2")
    for name in ("adamw", "muon"):
        assert_same(load_any(runs["straight"] / name / "step=3.ckpt"),
                    load_any(out / name / "last.ckpt"))
