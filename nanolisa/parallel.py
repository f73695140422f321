"""Training on several processes: torchrun, FSDP2 or DDP, and LISA across ranks.

`torchrun --nproc_per_node N train.py ...` starts N copies of train.py; each is one *rank* with its own
device and its own slice of every global batch (nanolisa/data.py: rank r takes rows r, r+N, r+2N, ...).
This module turns the finished single-device model into a data-parallel one; model.py never mentions it.

  FSDP2 (`--parallel fsdp`, the default): every parameter is split across the ranks (a DTensor shard on
        each). Before a unit runs forward or backward its full weights are all-gathered, afterwards freed;
        gradients are reduce-scattered, so each rank keeps the gradient and AdamW state of its shard only
        (nanolisa/adamw.py updates each rank's local shard). The units (see `shard`): each transformer
        block, the embedding, the final norm, then the root (which picks up whatever is left); the LM
        head stays split by vocabulary over the ranks, never gathered (nanolisa/vocab_parallel.py).
        LISA freezes and unfreezes whole blocks, so a unit is always wholly frozen or wholly trainable: a
        frozen block costs no gradient and no optimizer state on any rank.
  DDP   (`--parallel ddp`): every rank holds the whole model; gradients are all-reduced after backward.
        DDP registers the parameters that require grad when it is built, so under LISA it is rebuilt at
        each switch over the blocks that train now (a rebuild is cheap: no weights move).

Both average gradients over the ranks, while nanolisa's loss is a *sum* over the loss-bearing tokens of
the global step divided by their global count: each rank's loss is therefore multiplied by world_size
(see trainer.forward_backward), so N ranks compute exactly the gradient of one rank with N times the batch.

Mixed precision: with `--dtype bf16` (the default on GPUs), FSDP2 keeps fp32 master weights and runs
forward/backward in bf16 (MixedPrecisionPolicy), reducing gradients in fp32; the same on CPU (gloo) when
--dtype bf16 is asked for, which is how the tests run it. DDP and one process use autocast instead.

Waiting: a collective that waits more than COLLECTIVE_TIMEOUT means a rank hung or died. The one long wait
of a healthy run, the others waiting while rank 0 alone writes the final model, has its own timeout.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from nanolisa.errors import UserError
from nanolisa.loss import IGNORE_INDEX
from nanolisa.runtime import pick_device

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)  # a rank that waits longer in a collective: something hung
WRITE_TIMEOUT = datetime.timedelta(hours=2)  # the ranks waiting while rank 0 alone writes the final model


@dataclass(frozen=True)
class World:
    """Who this process is among the ranks torchrun started (rank 0 of 1 without torchrun)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A process group (gloo, on the CPU) used only to wait for rank 0's writing, with WRITE_TIMEOUT: rank 0
    # writing a 70B model alone takes longer than the training collectives' timeout allows.
    write_group: object = None

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
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=dev if dev.type == "cuda" else None)
    return replace(world, write_group=dist.new_group(backend="gloo", timeout=WRITE_TIMEOUT)), dev


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
    """FSDP2, in place: each block, the embedding, the final norm (+ head), then the root.

    The units follow torchtitan's parallelize() -- one per transformer block, then the root -- with choices
    of our own: the embedding and the final norm are units of their own (LISA always trains them, so their
    gradients never share a unit with a frozen block), and the norm's unit stays gathered after forward
    (`reshard_after_forward=False`): backward needs it at once, so resharding it would only gather it again.
    A plain head is no unit at all: each rank keeps its rows of it, FSDP2 leaves it alone (`ignored_params`)
    and the loss runs split by vocabulary over the ranks (nanolisa/vocab_parallel.py); a head that is not
    a plain bias-free Linear (LoRA on lm_head) joins the norm's unit. With tied embeddings the embedding and
    the head share one Parameter, which must stay in one unit: they are left to the root. The model may be
    on the meta device (nanolisa/sharded_load.py shards it before any weight exists);
    `init_while_trainable` then follows once the weights are in. The embedding's gradient skips FSDP2's
    reduce-scatter: see ShardedGradEmbedding.

    Activation checkpointing needs no wrapper: model.py recomputes each block itself when
    model.gradient_checkpointing is set, so no `_checkpoint_wrapped_module.` prefix exists to leak into
    anything saved. Mixed precision (`mp_dtype`, e.g. bf16): each unit gathers its weights in mp_dtype for
    forward and backward, keeps fp32 master weights and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # (see is_sharded)
    from nanolisa.vocab_parallel import can_split, split_head  # it builds on this module's chunk_rows
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    ignored: set[nn.Parameter] = set()  # parameters sharded by nanolisa, not by an FSDP2 unit
    for block in model.blocks:  # 1. one unit per transformer block: LISA's unit of freezing
        fully_shard(block, mp_policy=mp)
    if not model.config.tie_word_embeddings:
        for m in model.embed_modules:  # 2. the input embedding(s), whose backward writes rows to shards
            if type(m) is nn.Embedding:
                m.__class__ = ShardedGradEmbedding
        embed = fully_shard(list(model.embed_modules), mp_policy=mp)
        # An embedding's backward needs the token ids only, not its weights: not gathered for backward.
        (embed[0] if isinstance(embed, list) else embed).set_unshard_in_backward(False)
        norm, head = model.head_modules
        if can_split(head):  # 3. the final norm; the head split by vocabulary (nanolisa/vocab_parallel.py)
            fully_shard(norm, mp_policy=mp, reshard_after_forward=False)
            split_head(model, next(model.blocks[0].parameters()).device_mesh)
            ignored = {head.weight}
        else:  # 3. final norm + head
            fully_shard([norm, head], mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mp_policy=mp, ignored_params=ignored)  # 4. the root: what is left, the step's hooks
    return model


class ShardedGradEmbedding(nn.Embedding):
    """An FSDP2-sharded nn.Embedding whose backward writes each rank's gradient rows straight into its shard.

    FSDP2 would make the embedding's gradient whole on every rank -- (vocab, C), mostly zero rows, since a
    batch uses a few thousand of the vocabulary's tokens -- copy it into a reduce-scatter buffer as large,
    and keep only this rank's rows. That is twice the whole table in fp32 at the end of backward, when every
    other gradient exists too: the run's peak (2 x 131 MB at vocabulary 32000 and width 1024; 2 x 2.1 GB for
    Llama 3's 128256 x 4096). Instead the ranks exchange what the gradient is made of, their token ids and
    the gradient of the embedding's output (n x C each, small), and each rank adds into its own rows only:
    the same sum, (sum over ranks) / N as FSDP2 averages it, accumulated in fp32. Forward is unchanged: FSDP2
    gathers the table, looks the tokens up and frees it."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _LookUp.apply(ids, self.weight, self)


class _LookUp(torch.autograd.Function):
    """F.embedding forward; a backward that fills the sharded parameter's gradient and returns none for the
    gathered weight (so FSDP2 has nothing to reduce-scatter for this unit)."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, module: nn.Embedding) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.module = module
        return nn.functional.embedding(ids, weight)  # (B, T, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad (B, T, C)
        (ids,) = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            add_rows_to_shard(ctx.module.weight, ids.reshape(-1), grad.reshape(-1, grad.size(-1)).float())
        return None, None, None


def chunk_rows(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of the n rows of dimension 0 that `rank` holds, split as torch.chunk splits them (FSDP2's
    shards, DTensor's Shard(0)): ceil(n / world_size) rows a rank from rank 0 on, so the last ranks may hold
    fewer rows, or none."""
    c = -(-n // world_size)
    start = min(rank * c, n)
    return start, min(start + c, n)


@torch.no_grad()
def add_rows_to_shard(param: torch.Tensor, ids: torch.Tensor, grad: torch.Tensor) -> None:
    """Add the embedding gradient of every rank's tokens (ids (n,), grad (n, C)) to this rank's rows of
    param.grad. `param` is the sharded DTensor (FSDP2 puts it back on the module after forward); its rows
    are the rank's torch.chunk of dim 0: ceil(V / N) rows from rank * ceil(V / N) on."""
    from torch.distributed.tensor import DTensor
    group = param.device_mesh.get_group()
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = param.to_local()
    start = chunk_rows(param.size(0), n, rank)[0]
    counts = [torch.zeros(1, dtype=torch.long, device=ids.device) for _ in range(n)]  # ranks' token counts
    dist.all_gather(counts, torch.tensor([ids.numel()], device=ids.device), group=group)
    longest = int(max(c.item() for c in counts))
    every_ids = [ids.new_empty(longest) for _ in range(n)]
    every_grad = [grad.new_empty(longest, grad.size(1)) for _ in range(n)]
    dist.all_gather(every_ids, nn.functional.pad(ids, (0, longest - ids.numel())), group=group)
    dist.all_gather(every_grad, nn.functional.pad(grad, (0, 0, 0, longest - ids.numel())), group=group)  # fp32
    out = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)  # (V / N, C)
    for c, i, g in zip(counts, every_ids, every_grad):  # rank by rank, in rank order
        i, g = i[:c.item()], g[:c.item()]
        mine = (i >= start) & (i < start + rows.size(0))
        # Each rank's sum per row first (in token order, as F.embedding's backward adds), then into `out`:
        # the sums FSDP2 would reduce, added in the same order, so the same bits where ranks agree.
        used, where = torch.unique(i[mine] - start, return_inverse=True)
        out.index_add_(0, used, torch.zeros(len(used), g.size(1), device=g.device).index_add_(0, where, g[mine]))
    out = out.div_(n).to(rows.dtype)  # FSDP2 averages gradients over the ranks
    if param.grad is None:
        param.grad = DTensor.from_local(out, param.device_mesh, param.placements, shape=param.shape,
                                        stride=param.stride(), run_check=False)
    else:  # a later micro-batch of the same step
        param.grad.to_local().add_(out)


@torch.no_grad()
def init_while_trainable(model: nn.Module) -> None:
    """Let FSDP2 initialise every unit while all parameters are trainable (call it once the sharded
    weights are in place, before the first step).

    FSDP2 initialises lazily, at the first forward, and fixes then each unit's gradient dtypes from the
    parameters that require grad at that moment. LISA has frozen all but a few blocks by then; a block
    frozen at that moment and activated later would receive bf16 gradients where FSDP2 expects fp32 and
    fail ("attempting to assign a gradient with dtype BFloat16 to a tensor with grad_dtype Float"). So: one
    forward pass of one token, with every parameter trainable. It goes through the loss, with no target,
    not through the logits: a split head (nanolisa/vocab_parallel.py) would gather itself for the logits."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)
    device = next(iter(model.parameters())).device
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    model(ids, targets=torch.full_like(ids, IGNORE_INDEX))
    for p, trainable in flags:
        p.requires_grad_(trainable)
    reshard(model)


def reshard(model: nn.Module) -> None:
    """Free every FSDP2 unit's gathered weights after a forward pass that no backward follows (evaluation,
    `init_while_trainable`). The final norm's unit stays gathered after forward for its backward; without a
    backward it would stay gathered -- with the gathered tensors, not the shards, as the module's registered
    parameters -- into the next optimizer step, which updates the shards: the next forward would use stale
    weights, and a checkpoint would not find the optimizer's parameters. (A no-op without FSDP2.)"""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded (see is_sharded)
    for m in model.modules():
        if fsdp is not None and isinstance(m, fsdp.FSDPModule):
            m.reshard()


def replicate(model: nn.Module, first: bool) -> DistributedDataParallel:
    """DDP over the parameters that require grad now. The first build checks every rank starts from the
    same weights (rank 0's are broadcast); rebuilds after a LISA switch need no such sync.
    `gradient_as_bucket_view`: each gradient is a view into DDP's all-reduce buckets rather than a second
    copy of them, so the trainable gradients are held once, not twice."""
    return DistributedDataParallel(model, init_sync=first, gradient_as_bucket_view=True)


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


def barrier(world: World, after_writing: bool = False) -> None:
    """Wait for every rank. `after_writing`: the others wait while rank 0 writes files alone, which may
    take longer than a training collective may (WRITE_TIMEOUT, not COLLECTIVE_TIMEOUT)."""
    if world.distributed:
        dist.barrier(group=world.write_group if after_writing else None)


def is_sharded(t: torch.Tensor) -> bool:
    """Whether t is an FSDP2 shard (a DTensor).

    torch.distributed.tensor and .fsdp take a second or more to import, which every train.py, chat.py and
    eval.py would pay before its first line of output. So nanolisa imports them only where it shards
    (`shard`; DCP, nanolisa/resume.py, imports them too), and asks sys.modules here: a DTensor cannot
    exist before its module is imported."""
    tensor = sys.modules.get("torch.distributed.tensor")
    return tensor is not None and isinstance(t, tensor.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, or the tensor itself (which
    shares its memory: writing to it in place writes to the parameter)."""
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from an FSDP2 shard (a collective: every rank must call it), or t itself."""
    return t.full_tensor() if is_sharded(t) else t


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients, over every rank's shards."""
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return full_tensor(total)
