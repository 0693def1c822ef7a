"""``--trainer.strategy fsdp2``: FSDP2 (``torch.distributed.fsdp.fully_shard``) as a Lightning
strategy name, and the per-block sharding the toolkit's modules apply in ``configure_model``.

FSDP2 (PyTorch's per-parameter FSDP, Zhao et al. 2023 "PyTorch FSDP" for the algorithm) shards
every parameter by rows across the data-parallel ranks and all-gathers a block's weights just
before it runs. Lightning runs it through ``ModelParallelStrategy``, whose ``"auto"`` sizes are
meant for tensor parallelism (tensor-parallel size = devices); ``fsdp2`` is that strategy with
the data-parallel size set to every process (devices x nodes) and tensor parallelism 1.
Checkpoints are ``torch.distributed.checkpoint`` folders (each rank writes its shards), which
load on any number of ranks.
"""
from __future__ import annotations

from typing import Iterable

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

NAME = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with data-parallel size = all processes, tensor-parallel size 1."""

    def __init__(self, **kwargs):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def register() -> None:
    if NAME not in StrategyRegistry:
        StrategyRegistry.register(NAME, FSDP2Strategy,
                                  description="FSDP2 (fully_shard) over all processes, data parallel")


def shard_blocks(model: nn.Module, blocks: Iterable[nn.Module], device_mesh) -> bool:
    """``fully_shard`` each of ``blocks`` then ``model`` (the rest: embeddings, head) over the
    data-parallel dimension of Lightning's ``device_mesh``. False (nothing done) when there is
    no mesh or ``model`` is already sharded (``configure_model`` runs again for test after fit)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    if device_mesh is None or isinstance(model, FSDPModule):
        return False
    if device_mesh.mesh_dim_names and "tensor_parallel" in device_mesh.mesh_dim_names:
        if device_mesh["tensor_parallel"].size() != 1:
            raise ValueError(f"the toolkit's modules shard for data parallelism only, but the "
                             f"device mesh has tensor_parallel size "
                             f"{device_mesh['tensor_parallel'].size()}: use --trainer.strategy "
                             f"{NAME} (tensor parallel size 1)")
        device_mesh = device_mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return True


register()
