"""Muon under DDP: two CPU processes (gloo) give the weights and the full optimizer state of
one process, while each rank orthogonalizes only about half of the matrices."""
import pytest
import gc

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import optimizers
from optimizers import newton_schulz
from toolkit.models.gpt import GPT, GPTConfig

pytestmark = pytest.mark.slow  # several processes (the fast lane skips them)

STEPS, BATCH = 3, 8


def _model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16))


def _batch(step):
    x = torch.randint(0, 65, (BATCH, 17), generator=torch.Generator().manual_seed(step))
    return x[:, :-1], x[:, 1:]


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


# NorMuon with every new option: Polar Express, cautious decay, its per-neuron state. fp32
# Newton-Schulz: DDP's averaged gradients differ from (g0 + g1) / 2 in the last fp32 bit, which a
# bf16 iteration can round up to a bf16 ulp (as in tests/test_optimizers_fsdp2.py).
OPTIONS = {"muon": {}, "normuon": {"ns_coefficients": "polar_express", "cautious_wd": True,
                                   "ns_dtype": "float32"}}


def _build(model, name="muon"):
    return optimizers.build_optimizer(model, name, lr=0.02, weight_decay=0.1, adam_lr=1e-2,
                                      **OPTIONS[name])


def _worker(rank, world, store, out, name="muon"):
    torch.set_num_threads(1)
    # A file store, not a TCP port: nothing to collide with other jobs on the machine.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ns = newton_schulz.orthogonalize_many(_ns_inputs(), 5)
    if rank == 1:  # not the owner of every matrix, yet it must end with every result
        torch.save(ns, f"{out}.ns")
    counted = []
    real = newton_schulz._batched
    newton_schulz._batched = lambda mats, *a: counted.append(len(mats)) or real(mats, *a)
    model = _model()
    ddp = DDP(model)
    opt = _build(model, name)
    half = BATCH // world
    for s in range(STEPS):
        x, y = _batch(s)
        opt.zero_grad()
        _loss(ddp, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
        opt.step()
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out)
    torch.save(counted, f"{out}.count{rank}")
    # Drop the DDP reducer and finish pending gloo work while the group is alive: tearing
    # both down together can deadlock (a gloo thread waits for the GIL the destructor holds).
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _single_process_reference(name="muon"):
    """One process, gradients averaged over the two half batches as DDP averages them."""
    model = _model()
    opt = _build(model, name)
    for s in range(STEPS):
        x, y = _batch(s)
        grads = []
        for h in range(2):
            model.zero_grad()
            _loss(model, x[h * 4:(h + 1) * 4], y[h * 4:(h + 1) * 4]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    return model, opt


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_two_process_ddp_equals_one_process(tmp_path, name):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out, name), nprocs=2, join=True)
    # split Newton-Schulz + all-gather equals the local computation bit for bit
    local = newton_schulz.orthogonalize_many(_ns_inputs(), 5, distributed=False)
    for a, b in zip(torch.load(f"{out}.ns"), local):
        assert torch.equal(a, b)
    got = torch.load(out)
    ref_model, ref_opt = _single_process_reference(name)
    start = _model().state_dict()
    for name, p in ref_model.state_dict().items():
        assert not torch.equal(p, start[name]), name
        torch.testing.assert_close(got["model"][name], p, rtol=0, atol=1e-6, msg=name)
    # rank 0's checkpoint holds every momentum buffer and Adam moment, equal to one process
    ref_state = ref_opt.state_dict()["state"]
    assert set(got["opt"]["state"]) == set(ref_state)
    for k, st in ref_state.items():
        for key, v in st.items():
            if torch.is_tensor(v):
                torch.testing.assert_close(got["opt"]["state"][k][key], v, rtol=0, atol=1e-6)
    # the Newton-Schulz work was split: each rank orthogonalized half of the 8 matrices
    n_hidden = sum(1 for g in ref_opt.param_groups if g["use_muon"] for _ in g["params"])
    for r in range(2):
        counts = torch.load(f"{out}.count{r}")
        assert counts and all(c == n_hidden // 2 for c in counts), counts


def _ns_inputs():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(s, generator=g) for s in [(24, 8), (8, 24), (24, 8), (16, 16), (40, 8)]]
