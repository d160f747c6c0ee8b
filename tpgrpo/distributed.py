"""Multi-process training: the ``fsdp2`` strategy and the few collectives the module needs.

``--trainer.strategy ddp``: every rank holds the whole model (frozen base replicated), DDP
averages the LoRA gradients. ``--trainer.strategy fsdp2``: `FSDP2Strategy`, Lightning's
`ModelParallelStrategy` set up for pure data parallelism: `TPGRPOModule.configure_model` shards
each transformer block with ``fully_shard`` (frozen base and LoRA alike) over all ranks, and
checkpoints are gathered into one file on rank 0, so they load in a single-process run and back.
It also runs on CPU (gloo), which is how the test suite checks it.

Both strategies average gradients over ranks after every backward pass, so every rank must run
the same number of transformer forward and backward passes in the same order (FSDP2 also
all-gathers weights in each forward). The module keeps to that: the SDE window is the same on
every rank, update micro-batches are padded to the largest rank's count, and evaluation batches
have equal sizes on every rank (`tpgrpo.training.data.EvalSampler`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import Tensor, nn


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` with every rank a data-parallel shard (no tensor parallelism).

    Args:
        save_distributed_checkpoint: False (default): checkpoints are one file written by rank 0
            (the LoRA and optimizer state are small), loadable by any number of processes.
            True: one shard per rank in a folder.
        **kwargs: the other arguments of `ModelParallelStrategy`.
    """

    strategy_name = "fsdp2"

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs: Any):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # the parent's "auto" means one shard group per node
            self._data_parallel_size = self.num_nodes * self.num_processes // int(self._tensor_parallel_size)
        super().setup_environment()


if FSDP2Strategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        FSDP2Strategy.strategy_name, FSDP2Strategy, description="FSDP2 (fully_shard per transformer block)"
    )


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers transformer (the units that are sharded and checkpointed).

    The classes the model lists in ``_repeated_blocks`` (FLUX, Qwen-Image, FLUX.2, Z-Image: the
    latter's refiner blocks too), else the ``transformer_blocks`` and ``single_transformer_blocks``
    lists (SD3). Subclasses count, so blocks already wrapped by ``fully_shard`` are found.
    """
    repeated = set(getattr(type(transformer), "_repeated_blocks", None) or ())
    if repeated:
        blocks = [
            module for module in transformer.modules()
            if any(cls.__name__ in repeated for cls in type(module).__mro__)
        ]
    else:
        blocks = []
        for name in ("transformer_blocks", "single_transformer_blocks"):
            blocks.extend(getattr(transformer, name, None) or [])
    if not blocks:
        raise TypeError(f"{type(transformer).__name__} has no transformer_blocks to shard")
    return blocks


def shard_transformer(transformer: nn.Module, mesh: Any, param_dtype: torch.dtype | None = None) -> None:
    """``fully_shard`` each block, then the rest of the transformer, over ``mesh`` (in place).

    ``param_dtype`` (e.g. bfloat16): compute in that dtype, reduce gradients in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    reduce_dtype = torch.float32 if param_dtype else None
    # Only the root casts the transformer's inputs. A block that casts its own inputs sees other
    # dtypes when gradient checkpointing recomputes it: torch < 2.13 skips the cast in recomputation.
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in transformer_blocks(transformer):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(transformer, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate the equally shaped ``tensor`` of every rank along dim 0 (rank order); itself alone."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _all_reduce(value: int | float, op: Any, device: torch.device | str) -> float:
    if world_size() == 1:
        return value
    tensor = torch.tensor(float(value), device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.item()


def all_ranks_max(value: int | float, device: torch.device | str = "cpu") -> float:
    """The largest ``value`` over ranks (``value`` itself in a single process)."""
    return _all_reduce(value, dist.ReduceOp.MAX, device)


def all_ranks_sum(value: int | float, device: torch.device | str = "cpu") -> float:
    """The sum of ``value`` over ranks."""
    return _all_reduce(value, dist.ReduceOp.SUM, device)


def _same(value):
    return value


@dataclass(frozen=True)
class Collectives:
    """The cross-rank operations a GRPO step needs, passed to an algorithm (`tpgrpo.algorithms.FlowAlgorithm`).

    The defaults are one process. ``gather_rows`` concatenates every rank's equally shaped tensor
    along dim 0 in rank order; ``max`` and ``sum`` reduce a number over ranks.
    """

    rank: int = 0
    world_size: int = 1
    gather_rows: Callable[[Tensor], Tensor] = _same
    max: Callable[[float], float] = _same
    sum: Callable[[float], float] = _same

    @classmethod
    def from_process_group(cls, device: torch.device | str = "cpu") -> Collectives:
        """``torch.distributed``'s default group (one process when it is not initialised);
        the collectives run on ``device`` (the NCCL backend needs the GPU)."""
        if world_size() == 1:
            return cls()
        return cls(
            rank=dist.get_rank(),
            world_size=world_size(),
            gather_rows=lambda tensor: gather_rows(tensor.to(device)).to(tensor.device),
            max=lambda value: all_ranks_max(value, device),
            sum=lambda value: all_ranks_sum(value, device),
        )
