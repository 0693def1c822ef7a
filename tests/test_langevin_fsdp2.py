"""Langevin noise on FSDP2-sharded parameters (2 CPU processes, gloo): each rank adds the rows
of the noise that one process adds to the whole tensor, so the sharded run's weights are the
single-process weights."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regularizers.langevin.core import add_langevin_noise_
from toolkit.seeding import generator

T, LR = 1e-2, 0.5


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))  # 5 rows: uneven


def _noisy(model):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(2):
        add_langevin_noise_(opt.param_groups, T, generator(7, step))


def _worker(rank, world, store, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = _model()
    for layer in model:
        fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    _noisy(model)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_langevin_noise_equals_one_process(tmp_path):
    out = tmp_path / "sharded.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ref, before = _model(), _model().state_dict()
    _noisy(ref)
    got = torch.load(out, weights_only=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
        assert not torch.equal(v, before[k])  # noise was added
