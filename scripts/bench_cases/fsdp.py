"""``fsdp-muon-step``: one Muon step on 2 CPU ranks (gloo) under FSDP2 vs under DDP.

Two worker processes stay up for the whole case, each holding the same GPT twice: plain
(DDP: every rank holds every matrix, the Newton-Schulz work is split and the bf16 results
all-gathered, :mod:`optimizers.newton_schulz`) and ``fully_shard``-ed (FSDP2: rows sharded,
each matrix gathered to one owner by all-to-all and its direction sent back,
:mod:`optimizers.sharded`). Both get the same fixed gradients (as after DDP's all-reduce or
FSDP2's reduce-scatter), so one timed repetition is exactly one ``optimizer.step()`` on both
ranks. Sizes: GPT-2 small (12 x 768, vocab 50304; ``--quick``: 4 x 256, vocab 65).

Extra figures: bytes the FSDP2 step sends per rank per step, counted at
``torch.distributed.all_to_all_single`` (minus each rank's copy to itself), against the
minimum, one gather and one scatter of every hidden matrix: ``(world-1)/world`` of its fp32
momentum in and of its direction (bf16) out; and tensor memory per rank (parameters,
gradients, optimizer state) in each mode.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scripts.harness import Bench, case

WORLD = 2


def _gpt(quick: bool):
    from toolkit.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = (GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=256) if quick
           else GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    return GPT(cfg)


def _grads(model, shard: bool) -> None:
    from torch.distributed.tensor import DTensor
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=g) * 1e-3
        if isinstance(p, DTensor):
            ref = p.to_local()
            full = full.chunk(WORLD)[dist.get_rank()] if ref.numel() else ref.new_zeros(ref.shape)
            full = DTensor.from_local(full.reshape(ref.shape).clone(), p.device_mesh, p.placements,
                                      shape=p.shape, stride=p.stride(), run_check=False)
        p.grad = full


def _tensor_bytes(model, opt) -> int:
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    n = sum(local(p).numel() * p.element_size() * 2 for p in model.parameters())  # + grads
    return n + sum(local(v).numel() * v.element_size() for st in opt.state.values()
                   for v in st.values() if torch.is_tensor(v))


def _worker(rank: int, store: str, quick: bool, cmds, done) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import optimizers
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    sent = {"bytes": 0}
    real = dist.all_to_all_single

    def counting(out, inp, out_splits=None, in_splits=None, group=None, **kw):
        me = dist.get_rank(group)
        per = in_splits[me] if in_splits else inp.numel() // dist.get_world_size(group)
        sent["bytes"] += (inp.numel() - per) * inp.element_size()
        return real(out, inp, out_splits, in_splits, group=group, **kw)

    dist.all_to_all_single = counting
    hp = dict(lr=0.02, weight_decay=0.1, adam_lr=3e-4)
    models = {"ddp": _gpt(quick), "fsdp2": _gpt(quick)}
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in models["fsdp2"].blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(models["fsdp2"], mesh=mesh)
    opts = {k: optimizers.build_optimizer(m, "muon", **hp) for k, m in models.items()}
    for k, m in models.items():
        _grads(m, k == "fsdp2")
    groups = optimizers.param_groups(models["ddp"])
    minimum = sum((WORLD - 1) / WORLD * p.numel() * (4 + 2)
                  for g in groups if g["use_muon"] for p in g["params"])
    while (cmd := cmds.get()) != "stop":
        sent["bytes"] = 0
        opts[cmd].step()
        dist.barrier()
        done.put((rank, sent["bytes"], minimum, _tensor_bytes(models[cmd], opts[cmd])))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, quick: bool):
        ctx = mp.get_context("spawn")
        self.tmp = tempfile.mkdtemp()
        self.cmds = [ctx.Queue() for _ in range(WORLD)]
        self.done = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, daemon=True,
                                  args=(r, os.path.join(self.tmp, "store"), quick, self.cmds[r],
                                        self.done)) for r in range(WORLD)]
        for p in self.procs:
            p.start()
        self.last: dict[str, list] = {}

    def step(self, mode: str) -> None:
        for q in self.cmds:
            q.put(mode)
        self.last[mode] = sorted(self.done.get(timeout=1800) for _ in range(WORLD))


@case("fsdp-muon-step", target=1.3)
def fsdp_muon_step(quick: bool) -> Bench:
    """Muon step on 2 CPU ranks: FSDP2 (sharded, all-to-all) vs DDP (replicated, all-gather)."""
    pool = _Pool(quick)
    pool.step("fsdp2")
    pool.step("ddp")
    (_, sent0, minimum, mem_f0), (_, sent1, _, mem_f1) = pool.last["fsdp2"]
    mem_d = [r[3] for r in pool.last["ddp"]]
    extra = {"fsdp2_bytes_sent_per_step": sent0 + sent1, "minimum_bytes": int(minimum),
             "bytes_ratio_vs_minimum (target <= 1.10)": round((sent0 + sent1) / minimum, 4),
             "tensor_MB_per_rank_fsdp2": [round(m / 2**20, 1) for m in (mem_f0, mem_f1)],
             "tensor_MB_per_rank_ddp": [round(m / 2**20, 1) for m in mem_d],
             "model": "GPT 4x256 vocab 65" if quick else "GPT-2 small 12x768 vocab 50304",
             "ranks": WORLD, "threads_per_rank": 1}
    return Bench({"fsdp2": lambda: pool.step("fsdp2"), "ddp": lambda: pool.step("ddp")},
                 extra=extra)
