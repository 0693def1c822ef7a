"""Matrix optimizers (Muon, HyperP, Muon++, AuON, Hybrid-AuON) on FSDP2 (DTensor) parameters.

``torch.distributed.fsdp.fully_shard`` (FSDP2) turns every parameter into a DTensor sharded by
rows, ``Shard(0)`` over a 1-D mesh with ``torch.chunk`` sizes: rank ``r`` holds rows
``[r*c, (r+1)*c)`` of an ``n``-row weight, ``c = ceil(n / world)`` (trailing ranks may hold
fewer, or none). Elementwise work (momentum, the internal AdamW, weight decay) runs on the
local rows. Newton-Schulz (and AuON's Frobenius normalization) needs whole matrices, so the
direction of each hidden matrix is computed once in the job, by one owner rank, as in
microsoft/dion's FSDP2 Muon (Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates",
the "Muon with FSDP2" algorithm: all-to-all unshard, orthogonalize, all-to-all reshard):

1. owners: the greedy flop-balanced split of :func:`optimizers.newton_schulz._owners` (the DDP
   split), which deals same-shape matrices round-robin, so each owner's matrices of one shape
   are orthogonalized in one batched call;
2. one ``all_to_all_single`` sends each rank's momentum rows of matrix ``i`` to ``owner(i)``,
   which concatenates them into the full momentum;
3. owners compute the directions (``optimizer.directions``, exactly the single-process code);
4. one ``all_to_all_single`` sends every rank the rows of each direction it holds.

Per step a rank sends and receives ``(world-1)/world`` of each hidden matrix twice (its rows
out, the direction's rows back): one gather and one scatter of every matrix, the minimum for
computing each matrix's direction on a single rank. Payloads travel as raw bytes (gloo has no
bf16), so results are moved bit for bit. The update is then applied by
``optimizer.apply_update`` to the DTensor parameter with a DTensor direction (HyperP's norms
become all-reduces). State tensors are DTensors sharded like their parameters and are
created when the optimizer is built (:func:`init_state`), so every rank's state dict has the
same keys and ``torch.distributed.checkpoint`` can load into it.

Every rank must step the same matrices in the same order (true under FSDP2, where every rank
holds a shard of every parameter and gradients are reduce-scattered). Pure torch.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .newton_schulz import _owners

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Shard = None

__all__ = ["is_dtensor", "local", "shard_rows", "setup", "init_state", "directions",
           "comm_bytes"]

# bytes this process sent to other ranks in the all-to-alls of the matrix step (benchmarks)
comm_bytes = {"sent": 0, "steps": 0}


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an alias: in-place ops write the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_rows(n: int, world: int) -> list[tuple[int, int]]:
    """Row range ``[start, stop)`` each rank holds under ``Shard(0)`` (torch.chunk sizes)."""
    c = -(-n // world) if n else 0
    return [(min(r * c, n), min((r + 1) * c, n)) for r in range(world)]


def _where(name: str) -> str:
    return f" ({name})" if name else ""


def _check(p: torch.Tensor, name: str, mesh) -> None:
    if p.device_mesh.ndim != 1:
        raise ValueError(
            f"a matrix parameter{_where(name)} lives on a {p.device_mesh.ndim}-D device mesh "
            f"{p.device_mesh.mesh_dim_names}; the sharded matrix step handles FSDP2's 1-D "
            "data-parallel mesh only (no HSDP or tensor parallelism): call fully_shard(module, "
            "mesh=mesh['data_parallel']) with a 1-D mesh")
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"a matrix parameter{_where(name)} is placed as {tuple(p.placements)}; the sharded "
            "matrix step needs FSDP2's row sharding Shard(0) (fully_shard's default): do not "
            "pass shard_placement_fn, or shard that module's matrices by rows")
    start, stop = shard_rows(p.shape[0], p.device_mesh.size())[p.device_mesh.get_local_rank()]
    if p.to_local().shape[0] != stop - start:
        raise ValueError(f"a matrix parameter{_where(name)} of {p.shape[0]} rows holds "
                         f"{p.to_local().shape[0]} local rows, not torch.chunk's {stop - start}")
    if mesh is not None and p.device_mesh != mesh:
        raise ValueError("the optimizer's matrices are sharded over different device meshes: "
                         "shard the whole model with one fully_shard mesh")


def setup(opt: torch.optim.Optimizer) -> bool:
    """Validate ``opt``'s parameters; True (and state created, :func:`init_state`) when they are
    FSDP2 DTensors, False for plain tensors. FSDP1 flat parameters are refused."""
    dtensors, mesh = 0, None
    plain_matrix = None
    for g in opt.param_groups:
        for i, p in enumerate(g["params"]):
            name = (g.get("param_names") or [""] * len(g["params"]))[i]
            if getattr(p, "_fsdp_flattened", False):
                raise RuntimeError(
                    f"{type(opt).__name__} orthogonalizes whole weight matrices, but this "
                    "model's parameters are flattened by FSDP1 (FullyShardedDataParallel). Use "
                    "FSDP2 (torch.distributed.fsdp.fully_shard; --trainer.strategy fsdp2) or "
                    "strategy='ddp' instead.")
            if is_dtensor(p):
                dtensors += 1
                if g["use_muon"]:
                    _check(p, name, mesh)
                    mesh = p.device_mesh
            elif g["use_muon"]:
                plain_matrix = plain_matrix or name or tuple(p.shape)
    if not dtensors:
        return False
    if plain_matrix is not None:
        raise ValueError(f"matrix parameter {plain_matrix!r} is a plain tensor while others are "
                         "FSDP2 DTensors: call fully_shard on the root module too, so every "
                         "parameter is sharded")
    init_state(opt)
    return True


def init_state(opt: torch.optim.Optimizer) -> None:
    """Create every parameter's state now (``opt.initial_state(group, p)``), not at the first
    step: ranks then hold the same keys, and DCP loads a checkpoint into existing keys only."""
    for g in opt.param_groups:
        for p in g["params"]:
            for k, v in opt.initial_state(g, p).items():
                opt.state[p].setdefault(k, v)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _typed(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A byte slice read as ``dtype`` (copied when its offset is not aligned for that dtype)."""
    if buf.storage_offset() % torch.empty((), dtype=dtype).element_size():
        buf = buf.clone()
    return buf.view(dtype)


def _exchange(parts: list[list[torch.Tensor]], recv_sizes: list[int], group) -> list[torch.Tensor]:
    """all_to_all_single of byte payloads: ``parts[r]`` go to rank r; returns what each rank sent."""
    send = [torch.cat(ps) if ps else torch.empty(0, dtype=torch.uint8) for ps in parts]
    out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send[0].device)
    rank = dist.get_rank(group)
    comm_bytes["sent"] += sum(s.numel() for r, s in enumerate(send) if r != rank)
    dist.all_to_all_single(out, torch.cat(send), recv_sizes, [s.numel() for s in send],
                           group=group)
    return list(out.split(recv_sizes))


def directions(opt, entries: list[tuple[dict, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """DTensor directions of ``entries`` = (group, DTensor param, local momentum rows), each
    computed by ``opt.directions`` on the full matrix at its owner rank (see module doc)."""
    mesh = entries[0][1].device_mesh
    # the rank's coordinate on the 1-D data-parallel mesh (= its global rank on the toolkit's
    # mesh over all processes), not the node-local rank
    group, rank, world = mesh.get_group(), mesh.get_local_rank(), mesh.size()
    params = [p for _, p, _ in entries]
    owner = _owners([torch.Size((p.shape[0], math.prod(p.shape[1:]))) for p in params], world)
    rows = [shard_rows(p.shape[0], world) for p in params]
    row_bytes = [math.prod(p.shape[1:]) * p.element_size() for p in params]
    mine = [i for i, o in enumerate(owner) if o == rank]
    comm_bytes["steps"] += 1

    # 2. momentum rows of matrix i -> owner(i)
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for i, (_, _, u) in enumerate(entries):
        parts[owner[i]].append(_bytes(u))
    recv = _exchange(parts, [sum((rows[i][s][1] - rows[i][s][0]) * row_bytes[i] for i in mine)
                             for s in range(world)], group)
    offsets = [0] * world
    full = []
    for i in mine:
        p, pieces = params[i], []
        for s in range(world):
            n = (rows[i][s][1] - rows[i][s][0]) * row_bytes[i]
            pieces.append(_typed(recv[s][offsets[s]:offsets[s] + n], p.dtype)
                          .view(-1, *p.shape[1:]))
            offsets[s] += n
        full.append(torch.cat(pieces))

    # 3. directions of the owned matrices, by the single-process code
    dtypes = [opt.direction_dtype(g) for g, _, _ in entries]
    owned = opt.directions([(entries[i][0], params[i], m) for i, m in zip(mine, full)]) if mine else []

    # 4. direction rows -> the rank holding them
    parts = [[] for _ in range(world)]
    for i, d in zip(mine, owned):
        d = d.to(dtypes[i]).reshape(params[i].shape)
        for r, (a, b) in enumerate(rows[i]):
            parts[r].append(_bytes(d[a:b]))
    size = lambda i: (rows[i][rank][1] - rows[i][rank][0]) * math.prod(params[i].shape[1:])
    width = [torch.empty((), dtype=dt).element_size() for dt in dtypes]
    recv = _exchange(parts, [sum(size(i) * width[i] for i in range(len(entries)) if owner[i] == s)
                             for s in range(world)], group)
    offsets = [0] * world
    out = []
    for i, p in enumerate(params):
        s, n = owner[i], size(i) * width[i]
        d = _typed(recv[s][offsets[s]:offsets[s] + n], dtypes[i]).view(-1, *p.shape[1:])
        offsets[s] += n
        out.append(DTensor.from_local(d, mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride()))
    return out
