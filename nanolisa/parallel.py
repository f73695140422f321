"""Training on several processes: torchrun, FSDP2 or DDP, and LISA across ranks.

`torchrun --nproc_per_node N train.py ...` starts N copies of train.py; each is one *rank* with its own
device and its own slice of every global batch (nanolisa/data.py: rank r takes rows r, r+N, r+2N, ...).
This module turns the finished single-device model into a data-parallel one; model.py never mentions it.

  FSDP2 (`--parallel fsdp`, the default): every parameter is split across the ranks (a DTensor shard on
        each). Before a unit runs forward or backward its full weights are all-gathered, afterwards freed;
        gradients are reduce-scattered, so each rank keeps the gradient and AdamW state of its shard only.
        The units, in the order torchtitan's parallelize() uses: each transformer block, the embedding,
        the final norm + LM head, then the root (which picks up whatever is left). LISA freezes and
        unfreezes whole blocks, so a unit is always wholly frozen or wholly trainable: a frozen block costs
        no gradient and no optimizer state on any rank.
  DDP   (`--parallel ddp`): every rank holds the whole model; gradients are all-reduced after backward.
        DDP registers the parameters that require grad when it is built, so under LISA it is rebuilt at
        each switch over the blocks that train now (a rebuild is cheap: no weights move).

Both average gradients over the ranks, while nanolisa's loss is a *sum* over the loss-bearing tokens of
the global step divided by their global count: each rank's loss is therefore multiplied by world_size
(see trainer.forward_backward), so N ranks compute exactly the gradient of one rank with N times the batch.

Mixed precision: with `--dtype bf16` on GPUs, FSDP2 keeps fp32 master weights and runs forward/backward
in bf16 (MixedPrecisionPolicy), reducing gradients in fp32. On CPU (gloo) training stays in fp32 unless
--dtype asks for autocast.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from nanolisa.errors import UserError
from nanolisa.runtime import pick_device

@dataclass(frozen=True)
class World:
    """Who this process is among the ranks torchrun started (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world() -> World:
    """The World torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); known before any
    process group exists, so bad input can be reported before the ranks wait for each other."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init_world(device: str | None) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); the device of this rank."""
    world = launched_world()
    if not world.distributed:
        return world, pick_device(device)
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)  # one GPU per rank on each node
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                            device_id=dev if dev.type == "cuda" else None)
    return world, dev


def close_world(clean: bool = True) -> None:
    """Leave the process group. After a clean finish the ranks first wait for each other: a rank tearing
    down its connections while another still uses them can abort the process."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# The two ways of sharing the model


def shard(model: nn.Module, mp_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2, in place, in a fixed order: each block, the embedding, the final norm + head, the root.

    Activation checkpointing needs no wrapper: model.py recomputes each block itself when
    model.gradient_checkpointing is set, so no `_checkpoint_wrapped_module.` prefix exists to leak into
    anything saved. With tied embeddings the embedding and the head share one Parameter, which must stay
    in one unit: they are left to the root."""
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    for block in model.blocks:  # 1. one unit per transformer block: LISA's unit of freezing
        fully_shard(block, mp_policy=mp)
    if not model.config.tie_word_embeddings:
        fully_shard(list(model.embed_modules), mp_policy=mp)  # 2. the input embedding(s)
        fully_shard(list(model.head_modules), mp_policy=mp)  # 3. final norm + LM head: one unit, used together
    fully_shard(model, mp_policy=mp)  # 4. the root: what is left, and the hooks that start each step
    return model


def replicate(model: nn.Module, first: bool) -> DistributedDataParallel:
    """DDP over the parameters that require grad now. The first build checks every rank starts from the
    same weights (rank 0's are broadcast); rebuilds after a LISA switch need no such sync."""
    return DistributedDataParallel(model, init_sync=first)


# ----------------------------------------------------------------------------------------------------------
# Numbers the ranks agree on


def all_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sum over all ranks (a no-op on one rank): one collective for several numbers."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gather(value, world: World) -> list:
    """Every rank's value (any picklable object), on every rank, in rank order."""
    if not world.distributed:
        return [value]
    seen: list = [None] * world.world_size
    dist.all_gather_object(seen, value)
    return seen


def check_same_on_all_ranks(value, world: World, what: str) -> None:
    """Stop every rank at once if they disagree on `value` (e.g. the blocks LISA activated)."""
    seen = gather(value, world)
    if any(v != seen[0] for v in seen):
        raise UserError(f"the ranks disagree on {what}: {seen}; this is a bug, please report it")


def broadcast(value, world: World):
    """Rank 0's value on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from an FSDP2 shard (a collective: every rank must call it), or t itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients, over every rank's shards."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return full_tensor(total)
