"""Monitors on an FSDP2-sharded GPT (2 CPU processes, gloo) give the numbers of one process:
the spectral monitor gathers each sharded matrix when it measures it; massive-activation and
stability probes run inside the sharded forward."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toolkit.models.gpt import GPT, GPTConfig
from toolkit.monitors import SpectralMonitor, massive_activations, stability_indicators

pytestmark = pytest.mark.slow  # several processes (the fast lane skips them)


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=33, n_head=3, block_size=8))  # uneven shards


def _batch():
    return torch.randint(0, 65, (4, 8), generator=torch.Generator().manual_seed(0))


def _nudge(model):
    """A deterministic weight change, so the monitor's dW is measured too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(1.01 if "c_fc" in name else 0.995)


def _measure(model):
    spectral = SpectralMonitor(iters=20)
    first = spectral.measure(model)
    _nudge(model)
    second = spectral.measure(model)
    massive = {k: (s.top1, s.median, s.token, s.dim)
               for k, s in massive_activations(model, _batch()).items()}
    return {"W": first, "dW": second, "massive": massive,
            "stability": stability_indicators(model, _batch())}


def _worker(rank, world, store, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = _gpt()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.save(_measure(model), f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_monitors_on_fsdp2_equal_one_process(tmp_path):
    out = str(tmp_path / "res")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ref = _measure(_gpt())
    assert any(k.startswith("dW/") for k in ref["dW"]) and len(ref["massive"]) == 2
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=False)
        for part in ("W", "dW", "stability"):
            assert got[part].keys() == ref[part].keys(), part
            for k, v in ref[part].items():
                assert abs(got[part][k] - v) <= 1e-5 * max(1.0, abs(v)), (part, k, got[part][k], v)
        assert got["massive"].keys() == ref["massive"].keys()
        for k, (top1, median, token, dim) in ref["massive"].items():
            g = got["massive"][k]
            assert (g[2], g[3]) == (token, dim), k
            torch.testing.assert_close(torch.tensor(g[:2]), torch.tensor([top1, median]),
                                       rtol=1e-5, atol=1e-6)
