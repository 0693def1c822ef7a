"""Matrix optimizers on FSDP2 (fully_shard, DTensor parameters): two CPU processes (gloo), each
holding half of every matrix's rows, end with the weights and optimizer state of one process,
while every matrix's direction is computed exactly once in the job."""
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import optimizers
from optimizers import sharded
from toolkit.models.gpt import GPT, GPTConfig

MATRIX_OPTIMIZERS = ("muon", "hyperp", "muonpp", "auon", "hybrid_auon", "normuon")
STEPS, BATCH = 3, 8
# ns_dtype float32: the gradients FSDP2 reduce-scatters differ from one process's in the last
# fp32 bit, which bf16 Newton-Schulz would round up to bf16 ulps.
HP = {"lr": 0.02, "weight_decay": 0.1, "adam_lr": 1e-2, "ns_dtype": "float32"}


def hp(name: str) -> dict:
    """HP without what the optimizer refuses (AuON runs no Newton-Schulz, so no ns_dtype)."""
    return {k: v for k, v in HP.items() if k not in optimizers.OPTIMIZERS[name].refused}


def _gpt():
    # n_embd 33: hidden matrices of 33, 99 and 132 rows, so 2 ranks hold unequal shards
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=33, n_head=3, block_size=8))


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 5, 3)  # 5 filters of 3x3x3: a 4-D weight, rows 3 + 2
        self.mid = nn.Linear(20, 7)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.conv(x).flatten(1))))


def _batch(kind, step):
    g = torch.Generator().manual_seed(step)
    if kind == "gpt":
        x = torch.randint(0, 65, (BATCH, 9), generator=g)
        return x[:, :-1], x[:, 1:]
    return torch.randn(BATCH, 3, 4, 4, generator=g), torch.randint(0, 4, (BATCH,), generator=g)


def _loss(model, x, y):
    out = model(x)
    return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())


CASES = [("gpt", name) for name in MATRIX_OPTIMIZERS] + [("conv", "muon"), ("conv", "auon")]


def _make(kind):
    return _gpt() if kind == "gpt" else _ConvNet()


def _full(v):
    return v.full_tensor() if sharded.is_dtensor(v) else v


def _worker(rank, world, store, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for kind, name in CASES:
        model = _make(kind)
        for block in (model.blocks if kind == "gpt" else [model.conv, model.mid]):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = optimizers.build_optimizer(model, name, **hp(name))
        keys0 = {k: sorted(v) for k, v in opt.state_dict()["state"].items()}
        counted = []
        real = opt.directions
        opt.directions = lambda entries: counted.append(len(entries)) or real(entries)
        half = BATCH // world
        for s in range(STEPS):
            x, y = _batch(kind, s)
            opt.zero_grad()
            _loss(model, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
            opt.step()
        state = opt.state_dict()["state"]
        results[kind, name] = {
            "model": {k: _full(v).clone() for k, v in model.state_dict().items()},
            "state": {i: {k: _full(v) for k, v in st.items()} for i, st in state.items()},
            "keys0": keys0, "keys": {k: sorted(v) for k, v in state.items()},
            "local_types": {type(v).__name__ for st in state.values() for v in st.values()
                            if torch.is_tensor(v) and v.ndim},
            "counted": counted}
        del model, opt
        gc.collect()
    results["refusals"] = _refusals(mesh)
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _refusals(mesh):
    """Error messages for layouts the sharded step does not handle."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    msgs = []
    by_cols = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 2))
    fully_shard(by_cols, mesh=mesh, shard_placement_fn=lambda p: Shard(p.ndim - 1))
    half = _ConvNet()
    fully_shard(half.mid, mesh=mesh)  # conv left a plain tensor
    for model in (by_cols, half):
        try:
            optimizers.build_optimizer(model, "muon")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def _reference(kind, name):
    model = _make(kind)
    opt = optimizers.build_optimizer(model, name, **hp(name))
    for s in range(STEPS):
        x, y = _batch(kind, s)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    return model, opt


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    out = str(tmp / "res")
    mp.spawn(_worker, args=(2, str(tmp / "store"), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("kind, name", CASES)
def test_two_rank_fsdp2_equals_one_process(two_ranks, kind, name):
    ref_model, ref_opt = _reference(kind, name)
    start = _make(kind).state_dict()
    ref_state = ref_opt.state_dict()["state"]
    for got in (r[kind, name] for r in two_ranks):
        for k, p in ref_model.state_dict().items():
            assert not torch.equal(p, start[k]), k  # it trained
            torch.testing.assert_close(got["model"][k], p, rtol=1e-5, atol=1e-6, msg=k)
        assert got["state"].keys() == ref_state.keys()
        for i, st in ref_state.items():
            assert got["state"][i].keys() == st.keys(), i
            for key, v in st.items():
                if torch.is_tensor(v):
                    torch.testing.assert_close(got["state"][i][key].float(), v.float(),
                                               rtol=1e-5, atol=1e-6, msg=f"{i}.{key}")
                else:
                    assert got["state"][i][key] == v
        # state tensors are sharded like the parameters, and exist before the first step
        assert got["local_types"] == {"DTensor"}
        assert got["keys0"] == got["keys"]
    # each hidden matrix's direction was computed once in the job, split across the ranks
    n_hidden = sum(len(g["params"]) for g in ref_opt.param_groups if g["use_muon"])
    counts = [r[kind, name]["counted"] for r in two_ranks]
    assert [sum(c) for c in zip(*counts)] == [n_hidden] * STEPS
    assert all(len(c) == STEPS and min(c) >= 1 for c in counts), counts


@pytest.mark.slow  # two processes
def test_unsupported_layouts_are_refused_with_the_fix(two_ranks):
    by_cols, half = two_ranks[0]["refusals"]
    assert "Shard(0)" in by_cols and "shard_placement_fn" in by_cols
    assert "conv.weight" in half and "fully_shard on the root module" in half


def test_fsdp1_flat_parameters_are_refused_with_the_fix():
    p = torch.nn.Parameter(torch.randn(64))
    p._fsdp_flattened = True  # what FSDP1 sets on flat-parameter shards
    with pytest.raises(RuntimeError, match="fully_shard"):
        optimizers.Muon([{"params": [p], "use_muon": False}])


def test_shard_rows_follow_torch_chunk():
    for n in (0, 1, 3, 5, 33, 65, 99):
        for world in (1, 2, 3, 4, 8):
            got = [b - a for a, b in sharded.shard_rows(n, world)]
            chunks = [c.shape[0] for c in torch.arange(n).chunk(world)] if n else []
            assert got == chunks + [0] * (world - len(chunks)), (n, world)
