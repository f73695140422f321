"""Plan before you rent: the memory a training run will need, per component and per rank (`train.py --dry-run`).

`python train.py --dry-run <the flags of the real run>` reads config.json only. It builds the model on the meta
device (no memory), never reads a weight and writes nothing, and prints what each rank will hold at its peak.
The peak of a rank is the largest of these moments, each a sum of components:

  loading        process + the checkpoint as `trainer.setup` loads it: the whole model in one process and
                 under DDP, each rank's shard under FSDP2, plus one tensor as read (`loading_bytes`)
  forward        process + weights + AdamW m, v + saved activations, while the blocks run
  loss           the same + the fused loss at work: its chunk of logits, and the LM head's gradient, which
                 the fused loss computes in forward
  backward       process + weights + m, v + the activations not yet consumed + the gradients made so far +
                 the temporaries of the part being differentiated
  optimizer      process + weights + m, v + every gradient + AdamW's working slices
  checkpoint     process + weights + m, v + the resume checkpoint as it is written (--save-every)
  weights check  process + weights + m, v + isfinite's temporaries (before each checkpoint and the end)

One line per component (each is one function below, so a change in how a run holds memory is a change here):

  weights      P parameters in the dtype the trainer keeps them: fp32 master weights (mixed precision only
               changes what the matmuls compute in), 4P bytes; LoRA adds its adapters. FSDP: 4P / N per rank.
  gradients    4 bytes per trainable parameter: full fine-tuning all P; LoRA its adapters; LISA the embedding,
               the head and gamma blocks -- the gamma largest, its worst case. FSDP: divided by N.
  optimizer    AdamW's m and v: 8 bytes per trainable parameter (nanolisa/adamw.py allocates them lazily and
               frees them when LISA freezes a block, so only the active set ever holds any). FSDP: / N.
  activations  what autograd keeps for backward from one micro-batch. Not a formula: the dry run runs the
               model's own forward and backward on fake tensors (shapes and dtypes, no data: PyTorch's
               FakeTensorMode, as torchtitan's memory estimator does) and counts every tensor created and
               freed. It runs a probe of a few blocks -- one of each kind the run has: trained, frozen,
               frozen with nothing below to differentiate -- and adds them up over the real number of
               blocks, so 80 blocks cost no more to plan than 4. For a Llama block in fp32 on CPU this
               comes to (9C + 3H) floats per token trained and (5C + 2H) frozen -- a frozen Linear keeps
               no input, the gated MLP recomputes act(gate) from width 512 up (C the width, H the MLP's; the CPU's attention
               expands grouped keys and values to every head; nanolisa/activation_memory.py) -- and with
               --grad-checkpointing (or --checkpoint-frozen, for frozen blocks) to the block's input, C
               floats per token, plus one block recomputed in backward. Under bf16 autocast every trained
               Linear also keeps the bf16 copy of its fp32 weight (2 bytes per weight; a frozen one keeps
               the fp32 weight it already has), and autocast's cache keeps those copies until the forward
               ends even with checkpointing. Because it is counted
               from model.py, new families and new checkpointing policies plan right without a new formula.
  loss         kernels/linear_cross_entropy.py never builds the (B*T, V) logits: one chunk of c tokens at a
               time, c*V*4 bytes of fp32 logits (plus a c*V copy in the autocast dtype), next to the
               loss-bearing hidden states it saved, their gradient (n*C each), and under autocast a copy of
               the head in the compute dtype (V*C*2) (`loss_bytes`).
  temporaries  what backward allocates beyond activations and gradients (the gradients flowing through a
               block), AdamW's step (at most two slices of sqrt(v), 16 MB on CPU, 512 MB on CUDA:
               adamw.temp_elements), the check that the weights are finite (7 bytes per element of the
               largest weight), and under FSDP the gathered weights of the unit at work and its unsharded
               gradients.
  checkpoint   writing a resume checkpoint (--save-every) streams the weights and AdamW state to disk one
               tensor at a time: the largest tensor at most (`checkpoint_bytes`).
  runtime      the process itself: on CPU, measured by the dry run -- its resident set after two steps of the
               built-in tiny model with the same threads and precision (Python, torch, the code pages and
               thread pools a step touches; ~0.5 GB). On a GPU, the CUDA context: measured when a GPU is
               present, else CUDA_CONTEXT_BYTES.

Every moment is computed for one rank; FSDP divides weights, gradients and AdamW state by the world size N,
not activations (each rank runs its own micro-batch) nor the loss. With --grad-accum > 1 the gradients of
the earlier micro-batches stay alive through the later ones' forward and backward.

Checked against real runs (tests/test_plan.py; bench/HISTORY.md): the measured peak resident set of
train.py on CPU, full, LoRA and LISA, with and without --grad-checkpointing, at two shapes, a run writing a
resume checkpoint and a 2-rank FSDP run, each within 15%. On a GPU the same bytes are device memory, plus
what this plan does not count: the caching allocator's fragmentation (often 5-10%) and NCCL's buffers; the
probe traces the CPU's kernels (PyTorch's attention, CPU autocast) as stand-ins for the GPU's.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import sys
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanolisa.activation_memory import lean
from nanolisa.adamw import AdamW, temp_elements
from nanolisa.config import CONFIG_DTYPES, DTYPES, ModelConfig, read_config
from nanolisa.errors import UserError
from nanolisa.kernels import use_kernels
from nanolisa.kernels.linear_cross_entropy import default_chunk
from nanolisa.lora import LoRALinear
from nanolisa.model import build_model
from nanolisa.loss import next_token_nll
from nanolisa.presets import ASSETS, PRESETS, load_preset, preset_config
from nanolisa.runtime import set_threads
from nanolisa.tokenizer import load_tokenizer
from nanolisa.train_config import TrainConfig
from nanolisa.trainer import param_groups, setup_method
from nanolisa.vocab_parallel import can_split

GiB = 2**30
MiB = 2**20
# The CUDA context when no GPU is present to measure it: ~287 MB with lazy module loading, PyTorch's
# default since 1.13 (pytorch/pytorch#86509), plus cuBLAS's workspaces; rounded up.
CUDA_CONTEXT_BYTES = 512 * MiB
F32 = 4  # bytes: master weights, gradients and AdamW state are fp32


# ----------------------------------------------------------------------------------------------------------
# What is planned


@dataclass
class Target:
    """The run being planned: its settings, and where and how it computes."""
    cfg: TrainConfig
    model: ModelConfig
    world_size: int
    parallel: str | None  # "fsdp", "ddp" or None (one process)
    device: str  # "cpu" or "cuda"
    amp: torch.dtype | None  # autocast's dtype, None in fp32
    mp: torch.dtype | None  # FSDP's mixed-precision dtype on GPUs (weights gathered in it, no autocast)

    @property
    def shards(self) -> int:
        """By how much FSDP divides weights, gradients and AdamW state."""
        return self.world_size if self.parallel == "fsdp" else 1


def target(cfg: TrainConfig, world_size: int, device_memory: int | None) -> Target:
    """The Target of train.py's settings, as trainer.setup would choose: fsdp with several ranks, bf16 on a GPU."""
    if world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    if cfg.model in PRESETS and not os.path.isdir(cfg.model):
        model = preset_config(cfg.model, load_tokenizer(os.path.join(ASSETS, cfg.model)))
    elif os.path.isdir(cfg.model):
        model = read_config(cfg.model)
    else:
        raise UserError(f"--model {cfg.model}: no such model directory (or preset: {', '.join(PRESETS)})")
    if cfg.device is not None:
        try:
            device = torch.device(cfg.device).type
        except RuntimeError:
            raise UserError(f"--device {cfg.device!r}: not a device; use cpu, cuda, cuda:1, ...") from None
    else:  # planning for a GPU when one is here, or when its memory is given
        device = "cuda" if torch.cuda.is_available() or device_memory is not None else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--dry-run plans CPU and CUDA runs, not {device}")
    dtype = DTYPES[cfg.dtype or ("bf16" if device == "cuda" else "fp32")]
    parallel = (cfg.parallel or "fsdp") if world_size > 1 else None
    mp = dtype if parallel == "fsdp" and device == "cuda" and dtype != torch.float32 else None
    amp = None if mp or dtype == torch.float32 else dtype
    return Target(cfg, model, world_size, parallel, device, amp, mp)


# ----------------------------------------------------------------------------------------------------------
# The model, counted on the meta device


@dataclass
class Census:
    """Bytes of the model's parameters as the trainer holds them (fp32), from a model built on the meta device."""
    params: int  # every parameter (LoRA adapters included)
    base_params: int  # without LoRA adapters: what the checkpoint holds, in fp32
    always: int  # trainable outside the blocks: LISA's embedding and head, LoRA's modules_to_save
    blocks: list[int]  # trainable bytes of each block if it trains (LoRA: its adapters)
    largest: int  # the largest single parameter
    embed: int  # trainable bytes of the embedding(s)
    head: tuple[int, int, bool, bool]  # (V, C, head trainable, head fused)
    head_splits: bool  # a plain bias-free Linear head: FSDP2 splits it by vocabulary (nanolisa/vocab_parallel.py)
    units: list[int]  # FSDP units' bytes: each block, the embedding, norm + head (parallel.shard)


def census(t: Target) -> Census:
    """Build the model on the meta device, let the trainer's own set-up decide what trains, and count."""
    with torch.device("meta"):
        model = build_model(t.model)
        lisa = setup_method(model, t.cfg)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    params = list(model.parameters())  # a tied head appears once
    blocks = [nbytes(b.parameters()) if lisa else nbytes(p for p in b.parameters() if p.requires_grad)
              for b in model.blocks]
    in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
    always = nbytes(p for p in params if p.requires_grad and id(p) not in in_blocks)
    adapters = nbytes(p for m in model.modules() if isinstance(m, LoRALinear) for p in
                      (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector) if p is not None)
    head = model.lm_head
    V, C = head.weight.shape
    outside = [sum(nbytes(m.parameters()) for m in ms) for ms in (model.embed_modules, model.head_modules)]
    embed = nbytes(p for m in model.embed_modules for p in m.parameters() if p.requires_grad)
    return Census(params=nbytes(params), base_params=nbytes(params) - adapters, always=always, blocks=blocks,
                  largest=max(p.numel() * p.element_size() for p in params), embed=embed,
                  head=(V, C, head.weight.requires_grad, type(head) is torch.nn.Linear), head_splits=can_split(head),
                  units=[nbytes(b.parameters()) for b in model.blocks] + outside)


def trainable_blocks(t: Target, c: Census) -> list[int]:
    """The blocks whose gradients and AdamW state the run holds at its worst: all that train, or LISA's
    gamma largest (all blocks are alike in every supported family, so: any gamma)."""
    if t.cfg.method != "lisa":
        return c.blocks
    return sorted(c.blocks, reverse=True)[:t.cfg.lisa_layers]


# ----------------------------------------------------------------------------------------------------------
# Activations: the model's own forward and backward, traced on fake tensors


class MemoryTrace(TorchDispatchMode):
    """Counts the bytes of every storage an operation creates, from its creation until it is freed.

    Under FakeTensorMode tensors carry shapes, dtypes and devices but no data, and their storages are
    created and freed exactly as real ones would be (`weakref.finalize` sees the free). `mark(name)` records
    (bytes alive now, the most alive since the previous mark). Storages that existed before (the parameters)
    are never counted, views of them included."""

    def __init__(self, existing: list[torch.Tensor], last_position: int):
        super().__init__()
        self.alive: dict[int, int] = {t.untyped_storage()._cdata: 0 for t in existing}
        self.live = self.peak = 0
        self.marks: dict[str, tuple[int, int]] = {}
        self.last_position = last_position

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(): fake tensors hold no value
            if args[0].dtype.is_floating_point:
                raise RuntimeError(f"the model reads a value from its data ({func}); --dry-run cannot trace it")
            return self.last_position  # the one value the models read: the largest position id (rope)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._created(t.untyped_storage())
        return out

    def _created(self, storage) -> None:
        key = storage._cdata
        if key not in self.alive:
            self.alive[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.live -= self.alive.pop(key)

    def mark(self, name: str) -> None:
        self.marks[name] = (self.live, self.peak)
        self.peak = self.live


Sig = tuple[bool, bool]  # a block's kind: (its weights train, its input needs a gradient)


def block_kinds(t: Target, c: Census) -> tuple[list[Sig], bool]:
    """The kind of each block in the run's worst case, and whether the embedding trains.

    LISA's worst case: a block's gradients appear when backward reaches it, while the activations of every
    block below are still held, so the active blocks are the top gamma. With a frozen embedding the blocks
    below the lowest active one need no backward at all and keep nothing: the worst case then has block 0
    active (every block keeps its activations) and the others at the top."""
    L, cfg = len(c.blocks), t.cfg
    embed_trains = c.embed > 0
    if cfg.method != "lisa":
        trains = [c.blocks[j] > 0 for j in range(L)]
    else:
        g = cfg.lisa_layers
        active = set(range(L - g, L)) if embed_trains or g == 0 else {0} | set(range(L - g + 1, L))
        trains = [j in active for j in range(L)]
    kinds, needs = [], embed_trains
    for j in range(L):
        kinds.append((trains[j], needs))
        needs = needs or trains[j]
    return kinds, embed_trains


@dataclass
class Probe:
    """What a few traced blocks say about every block of a kind, in bytes (B and T as planned)."""
    before: int  # alive before block 0: the embedding's output, rope, the mask
    keeps: dict[Sig, int]  # what one block of a kind leaves alive after its forward
    final: int  # the final norm's saved tensors and the hidden states it returns
    forward_rise: int  # the most a forward step holds above what it leaves
    head: tuple[int, int]  # backward through the final norm: (rise above its start, change)
    blocks: dict[Sig, tuple[int, int]]  # a block's backward: (rise, change), its gradients included
    tail: tuple[int, int]  # block 0 and the embedding's backward
    cache: int  # what leaving autocast frees per trained block: cached casts of weights (--grad-checkpointing)
    hidden_grad: bool  # whether the hidden states need a gradient (anything below the head trains)
    param_bytes: int  # itemsize of the weights during compute (fp32, or FSDP's mixed-precision dtype)


def probe(t: Target, kinds: list[Sig], embed_trains: bool, batch: int, seq: int, ckpt: bool) -> Probe:
    """Trace one forward and backward of a model with one block of each kind (block 0's own kind first, the
    last kind twice: a block's forward is read between its start and the next block's)."""
    pattern = [kinds[0]] + list(dict.fromkeys(kinds[1:]))
    pattern.append(pattern[-1])
    default = torch.get_default_dtype()
    with FakeTensorMode():
        try:  # FSDP's mixed precision: every unit computes on its weights gathered in mp, without autocast
            torch.set_default_dtype(t.mp or default)
            model = build_model(dataclasses.replace(t.model, num_hidden_layers=len(pattern)))
            lean(model, t.cfg.checkpoint_frozen)  # as trainer.setup prepares it
            setup_method(model, dataclasses.replace(t.cfg, lisa_layers=0))
        finally:
            torch.set_default_dtype(default)
        for block, (trains, _) in zip(model.blocks, pattern):
            if t.cfg.method == "lisa":
                block.requires_grad_(trains)
        model.gradient_checkpointing = ckpt
        model.train()
        trace = MemoryTrace(list(model.parameters()) + list(model.buffers()), seq - 1)
        with trace:
            needs = _traced_step(model, trace, t, batch, seq)
    return _read_probe(trace.marks, pattern, needs, t.mp.itemsize if t.mp else F32)


def _traced_step(model, trace: MemoryTrace, t: Target, batch: int, seq: int) -> bool:
    """Forward to the hidden states and backward from them, marking the trace at block boundaries.
    Returns whether the hidden states needed a gradient."""
    n = len(model.blocks)
    state = {"forward": True}

    def before_block(j):
        def hook(module, args):
            if state["forward"]:  # not again when --grad-checkpointing recomputes the block in backward
                trace.mark(f"before {j}")
                if j > 0 and args[0].requires_grad:  # its input's gradient is ready: block j is done
                    args[0].register_hook(lambda g: trace.mark(f"backward {j}"))
        return hook

    def after_last(module, args, out):
        if state["forward"] and out.requires_grad:
            out.register_hook(lambda g: trace.mark("backward head"))

    handles = [b.register_forward_pre_hook(before_block(j)) for j, b in enumerate(model.blocks)]
    handles.append(model.blocks[n - 1].register_forward_hook(after_last))
    ids = torch.zeros(batch, seq, dtype=torch.long)
    position_ids = torch.zeros(batch, seq, dtype=torch.long) if t.cfg.pack else None
    with torch.autocast("cpu", dtype=t.amp) if t.amp else nullcontext():  # the trainer's loss runs in it too
        hidden = model.hidden_states(ids, position_ids)  # (B, T, C)
        trace.mark("forward")
    trace.mark("autocast exit")  # frees autocast's cached casts of trainable weights that nothing saved
    state["forward"] = False
    needs = hidden.requires_grad
    if needs:  # from the loss's gradient dL/dh; only changes count in backward, so holding hidden is harmless
        trace.mark("backward start")
        hidden.backward(torch.zeros_like(hidden))
        trace.mark("end")
    for h in handles:
        h.remove()
    return needs


def _read_probe(marks: dict[str, tuple[int, int]], pattern: list[Sig], needs: bool, itemsize: int) -> Probe:
    """Per-kind bytes from the marks of `_traced_step` (each mark: bytes alive, most alive since the last)."""
    last = len(pattern) - 1
    live = lambda name: marks[name][0]  # noqa: E731
    keeps: dict[Sig, int] = {}
    for j in range(last):
        keeps.setdefault(pattern[j], live(f"before {j + 1}") - live(f"before {j}"))
    final = live("forward") - live(f"before {last}") - keeps[pattern[last]]
    ends = [f"before {j}" for j in range(1, last + 1)] + ["forward"]
    forward_rise = max(marks[e][1] - marks[e][0] for e in ends)

    def segment(start: str, end: str) -> tuple[int, int]:  # (rise above the start, change)
        return marks[end][1] - live(start), live(end) - live(start)

    # Backward's marks in the order they come; one is missing where nothing flows (no block below trains).
    order = ["backward start", "backward head", *(f"backward {j}" for j in range(last, 0, -1)), "end"]
    present = [name for name in order if name in marks]
    parts = {end: segment(start, end) for start, end in zip(present, present[1:])}
    head, tail = parts.get("backward head", (0, 0)), parts.get("end", (0, 0))
    blocks: dict[Sig, tuple[int, int]] = {}
    for j in range(last, 0, -1):
        if f"backward {j}" in parts:
            blocks.setdefault(pattern[j], parts[f"backward {j}"])
    trained = sum(trains for trains, _ in pattern)
    cache = (live("forward") - live("autocast exit")) // trained if trained else 0
    return Probe(live("before 0"), keeps, final, forward_rise, head, blocks, tail, cache, needs, itemsize)


# ----------------------------------------------------------------------------------------------------------
# The components, one function each


def weight_bytes(t: Target, c: Census) -> int:
    """Every parameter in fp32 (the trainer's master weights), divided among FSDP's ranks."""
    return math.ceil(c.params / t.shards)


def gradient_bytes(t: Target, c: Census) -> int:
    """fp32 gradients of the trainable set at its largest (LISA: embedding, head and gamma blocks)."""
    return math.ceil((c.always + sum(trainable_blocks(t, c))) / t.shards)


def optimizer_bytes(t: Target, c: Census) -> int:
    """AdamW's m and v: two fp32 copies of the trainable set (the step counters are scalars)."""
    return 2 * gradient_bytes(t, c)


def adamw_step_bytes(t: Target, c: Census) -> int:
    """sqrt(v) is built temp_elements(device) at a time (adamw._slices: 16 MB on CPU, 512 MB on CUDA); the
    previous slice is freed only once the next exists, so two slices at most."""
    return 2 * F32 * min(temp_elements(torch.device(t.device)), gradient_bytes(t, c) // F32)


def loss_bytes(t: Target, c: Census, batch: int, seq: int, hidden_grad: bool) -> tuple[int, int, int]:
    """(most alive while the loss runs in forward, what it keeps for backward, of which the head's gradient).

    kernels/linear_cross_entropy.py, on the n = B*(T-1) tokens with a target (every token but the last of a
    row: the worst case): it keeps a copy of their hidden states (n*C) and their gradient dL/dh (n*C), and
    computes the head's fp32 weight gradient (V*C*4) in forward. Its loop holds one chunk of c tokens:
    the (c, V) logits in the compute dtype and in fp32, or, when the compute dtype is not fp32, the head
    cast to it once (V*C) and, off CUDA, the (V, C) product that is added to the fp32 gradient (on CUDA one
    GEMM adds it: linear_cross_entropy.add_outer_); chunks are 1024 tokens on a GPU. A head that is not a
    plain Linear (LoRA on lm_head) takes the unfused path: the (B*T, V) logits, their fp32 log-softmax
    and its gradient."""
    V, C, head_trains, fused = c.head
    n = batch * (seq - 1)
    s_h = t.mp.itemsize if t.mp else F32  # the hidden states: fp32 under autocast (the residual stream)
    s_c = (t.mp or t.amp or torch.float32).itemsize  # what the head's matmul computes in
    if head_splits(t, c):
        return split_loss_bytes(t, c, n, s_h, s_c)
    grads = V * C * F32 if head_trains else 0
    if not fused:
        logits = batch * seq * V
        return logits * (s_c + 2 * F32) + grads, logits * F32 + grads, grads
    kept = n * C * s_h * (2 if hidden_grad else 1) + n * (3 * F32 + 8)  # hidden copy, dL/dh; loss, lse, ids
    chunk = min(default_chunk(V, t.device), n)  # a GPU: 1024 tokens (assumed to fit its free memory)
    if s_c == F32:
        work = chunk * V * F32 + chunk * C * F32
    else:
        cast = V * C * s_c if not t.mp else 0  # under FSDP's mixed precision the gathered head is in s_c
        product = V * C * s_c if head_trains and t.device != "cuda" else 0  # CUDA: one fp32-output GEMM
        work = cast + max(chunk * V * (s_c + F32), chunk * V * s_c + product)
        work += 2 * chunk * C * s_c
    return kept + grads + work, kept + grads, grads


def split_loss_bytes(t: Target, c: Census, n: int, s_h: int, s_c: int) -> tuple[int, int, int]:
    """loss_bytes for FSDP2's vocabulary-parallel loss (nanolisa/vocab_parallel.py): the targets and
    log-sum-exp of every rank's N*n tokens (kept for backward), this rank's c = V/N rows of the head in the
    compute dtype, one other rank's hidden states (n*C) and a chunk of (chunk, c) fp32 logits. Backward,
    next, adds this rank's rows of the head's gradient (c*C fp32), its own dL/dh and another rank's part of
    theirs (n*C fp32 each), and the chunk again: counted here at its largest, since nothing is freed between
    the two."""
    V, C, head_trains, _ = c.head
    rows, tokens = math.ceil(V / t.shards), n * t.shards
    grads = rows * C * F32 if head_trains else 0
    kept = tokens * (8 + 2 * F32) + (rows * C * s_c if s_c != F32 else 0)  # targets, lse, g; the cast head
    chunk = min(default_chunk(rows, t.device), n)
    work = chunk * rows * (F32 + s_c) + n * C * (s_h + 2 * F32)  # logits; another rank's h, two parts of dL/dh
    return kept + grads + work, kept + grads, grads


def head_splits(t: Target, c: Census) -> bool:
    """Whether the head is split by vocabulary over the ranks (parallel.shard: FSDP2, untied, plain head)."""
    return embed_rows_to_shards(t) and c.head_splits


def fsdp_bytes(t: Target, c: Census) -> tuple[int, int]:
    """FSDP2's (or DDP's) working memory on a rank, (in forward, in backward), 0 without FSDP. In forward the unit at
    work is all-gathered: its whole weights in the compute dtype, twice while the gather's output is copied
    into the unit's parameters. In backward each unit is gathered again while the next one is prefetched,
    and its unsharded gradients (counted with the traced backward) are copied into the reduce-scatter's
    input buffer before they are reduced to this rank's shard. Sized by the largest unit (units: each
    block, the embedding, the final norm + head, the head left out when it is split by vocabulary;
    parallel.shard). Under DDP: its all-reduce buckets, a second copy of
    the trainable gradients, allocated when the wrapper is built."""
    if t.parallel == "ddp":
        return gradient_bytes(t, c), gradient_bytes(t, c)
    if t.parallel != "fsdp":
        return 0, 0
    s = (t.mp.itemsize if t.mp else F32) / F32
    blocks = trainable_blocks(t, c)
    if embed_rows_to_shards(t):  # the embedding unit: not gathered in backward, nothing to reduce-scatter
        head = c.head[0] * c.head[1] * F32 if c.head_splits else 0  # split: never gathered, nothing reduced
        units = c.units[:-1] + [c.units[-1] - head]
        trained = max([max(blocks, default=0), c.always - c.embed - (head if c.head[2] else 0)])
        return int(2 * max(units) * s), int((2 * max(units[:-2] + units[-1:]) + trained) * s)
    trained = max([max(blocks, default=0), c.embed, c.always - c.embed])
    return int(2 * max(c.units) * s), int((2 * max(c.units) + trained) * s)


def embed_rows_to_shards(t: Target) -> bool:
    """Whether the embedding's backward writes straight into each rank's shard (parallel.ShardedGradEmbedding:
    FSDP2 with an embedding of its own, not tied to the head)."""
    return t.parallel == "fsdp" and t.world_size > 1 and not t.model.tie_word_embeddings


def finite_check_bytes(t: Target, c: Census) -> int:
    """trainer.check_finite_weights (before each checkpoint and the final save) runs torch.isfinite on one
    parameter at a time: |w| in fp32 and its boolean masks, 7 bytes per element of the largest (local shard
    of a) parameter."""
    return math.ceil(c.largest / t.shards) * 7 // F32


def checkpoint_bytes(t: Target, c: Census) -> int:
    """What writing a resume checkpoint (--save-every) adds: resume.py hands the weights (LoRA: the adapters)
    and AdamW's state to torch.distributed.checkpoint through its StreamingHFWriter, which writes each file
    tensor by tensor from the tensors' own memory: at most one tensor more, the largest parameter (DCP's own
    HuggingFaceStorageWriter built each file in memory first: twice what is saved, measured 2.0x). On a GPU
    that one tensor is its host copy, not device memory. 0 when the run writes no checkpoint
    (--save-every 0, or no step before the last to write one at)."""
    cfg = t.cfg
    every = cfg.save_every if cfg.save_every >= 0 else max(1, (cfg.steps or 10) // 10)
    if every == 0 or (cfg.steps is not None and every >= cfg.steps) or t.device == "cuda":
        return 0
    return c.largest


def loading_bytes(t: Target, c: Census) -> int:
    """What `trainer.setup` holds while it loads, beyond the process. The checkpoint is read with plain reads,
    one tensor at a time, in its own dtype (nanolisa/pretrained.py: no memory map keeps its pages), then
    converted into the fp32 weights. One process and DDP load the whole model: the fp32 weights, plus the
    largest tensor as read when the checkpoint is not fp32 (an fp32 tensor read becomes the weight itself).
    FSDP2 builds on the meta device and each rank reads only its rows (nanolisa/sharded_load.py): its shard
    of every parameter plus its rows of the largest tensor as read. On a GPU the rows are read into host
    memory, so the device holds the weights only."""
    stored = CONFIG_DTYPES.get(t.model.dtype, torch.float32).itemsize
    weights = math.ceil(c.params / t.shards) if t.shards > 1 else c.base_params
    if t.device == "cuda":
        return weights
    if t.shards > 1:
        return weights + math.ceil(c.largest / t.shards) * stored // F32
    return weights + (0 if stored == F32 else c.largest * stored // F32)


def runtime_bytes(t: Target) -> tuple[int, int]:
    """(the process before its first step, the process once it has stepped), measured in this process.

    On CPU: this process's resident set before and after two training steps of the built-in tiny model
    (0.8M parameters, with the run's threads and precision). The first is what loading starts from; the
    second adds what any step touches whatever the model: the code pages of the kernels, the thread pools,
    the allocator's arenas, the first optimizer's imports. On a GPU: the CUDA context, measured as the
    device memory in use once this process has one (anything else on the device counts: it is not free for
    the run either), or CUDA_CONTEXT_BYTES when no GPU is here."""
    if t.device == "cuda":
        if not torch.cuda.is_available():
            return CUDA_CONTEXT_BYTES, CUDA_CONTEXT_BYTES
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        return total - free, total - free
    set_threads(t.cfg.threads)
    start = resident_bytes()
    model, _ = load_preset("tiny")
    use_kernels(model, "torch")  # the loss as train.py computes it on CPU
    model.train()
    optimizer = AdamW(param_groups(model, 0.0), lr=1e-4)
    ids = torch.zeros(2, 64, dtype=torch.long)  # (B, T)
    for _ in range(2):
        with torch.autocast("cpu", dtype=t.amp) if t.amp else nullcontext():
            loss = next_token_nll(model, ids, ids).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return start, resident_bytes()


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


# ----------------------------------------------------------------------------------------------------------
# The moments of a step, and the plan


COMPONENTS = ("runtime", "loading", "weights", "gradients", "optimizer", "activations", "loss", "temporaries",
              "checkpoint")


def backward_peak(t: Target, c: Census, p: Probe, kinds: list[Sig], acts: int, grads: int,
                  later: bool) -> tuple[int, int, int]:
    """Walk backward down the blocks from (activations, gradients) alive at its start: each part rises by
    its temporaries, frees its activations and leaves its gradients (fp32 shards under FSDP; none new in a
    later micro-batch, which adds into the gradients already there). Returns (activations, gradients,
    temporaries) at the most alive moment."""
    s = p.param_bytes / F32
    trained = dict(zip(kinds, c.blocks))  # kind -> bytes of a block of that kind if it trains
    grad_of = lambda k: int(trained[k] * s) if k[0] else 0  # noqa: E731
    parts = [(p.head, 0)] + [(p.blocks.get(k, (0, 0)), grad_of(k)) for k in reversed(kinds[1:])]
    tail_rise, tail_change = p.tail
    if embed_rows_to_shards(t):  # this rank's rows of the embedding's gradient, not the whole (V, C) table
        tail_rise += math.ceil(c.embed / t.shards) - int(c.embed * s)
    parts.append(((tail_rise, tail_change), grad_of(kinds[0]) + int(c.embed * s)))
    best = (acts, grads, 0)
    for (rise, change), g in parts:
        if acts + grads + rise > sum(best):
            best = (acts, grads, rise)
        acts += change - g
        grads += 0 if later else math.ceil(g / s / t.shards)
    return best if sum(best) >= acts + grads else (acts, grads, 0)


@dataclass
class Plan:
    """The planned peak of one rank: each moment of a step as component -> bytes."""
    target: Target
    batch: int
    seq: int
    grad_checkpointing: bool
    moments: dict[str, dict[str, int]]
    sizes: dict[str, int]  # each component at its largest, whichever moment that is
    per_block: dict[str, int]  # what one block of each kind keeps from its forward for backward

    @property
    def peak(self) -> str:
        """The moment that decides: the one with the most alive."""
        return max(self.moments, key=lambda m: sum(self.moments[m].values()))

    @property
    def components(self) -> dict[str, int]:
        return {k: self.moments[self.peak].get(k, 0) for k in COMPONENTS}

    @property
    def total(self) -> int:
        return sum(self.moments[self.peak].values())


def plan_step(t: Target, c: Census, runtime: tuple[int, int], probes: dict) -> Plan:
    """The five moments of one rank's step for t's settings (probes: a cache of traces)."""
    cfg = t.cfg
    kinds, embed_trains = block_kinds(t, c)
    key = (tuple(dict.fromkeys(kinds)), kinds[0], cfg.batch_size, cfg.seq_len, cfg.grad_checkpointing)
    if key not in probes:
        probes[key] = probe(t, kinds, embed_trains, cfg.batch_size, cfg.seq_len, cfg.grad_checkpointing)
    p = probes[key]
    start, run = runtime
    W, G, S = weight_bytes(t, c), gradient_bytes(t, c), optimizer_bytes(t, c)
    acts = p.before + sum(p.keeps[k] for k in kinds) + p.final
    loss_peak, loss_kept, head_grad = loss_bytes(t, c, cfg.batch_size, cfg.seq_len, p.hidden_grad)
    earlier = G if cfg.grad_accum > 1 else 0  # the gradients of the step's earlier micro-batches
    fsdp, fsdp_backward = fsdp_bytes(t, c)  # and DDP's buckets
    base = {"runtime": run, "weights": W, "optimizer": S}
    moments = {
        "loading": {"runtime": start, "loading": loading_bytes(t, c)},
        "forward": {**base, "gradients": earlier, "activations": acts, "temporaries": p.forward_rise + fsdp},
        "loss": {**base, "gradients": earlier + head_grad, "activations": acts, "loss": loss_peak - head_grad,
                 "temporaries": fsdp},
        "optimizer": {**base, "gradients": G, "temporaries": adamw_step_bytes(t, c) +
                      (fsdp if t.parallel == "ddp" else 0)},
        "checkpoint": {**base, "checkpoint": checkpoint_bytes(t, c)},
        "weights check": {**base, "temporaries": finite_check_bytes(t, c)},
    }
    hidden = cfg.batch_size * cfg.seq_len * c.head[1] * (t.mp.itemsize if t.mp else F32)  # freed after the loss
    start = acts - hidden - p.cache * sum(trains for trains, _ in kinds)  # backward starts outside autocast
    a, g, rise = max((backward_peak(t, c, p, kinds, start, earlier + head_grad, later)
                      for later in ([False, True] if earlier else [False])), key=sum)
    moments["backward"] = {**base, "gradients": g, "activations": a, "loss": loss_kept - head_grad,
                           "temporaries": rise + fsdp_backward}
    sizes = {k: max(m.get(k, 0) for m in moments.values()) for k in COMPONENTS}
    names = {(True, True): "trained", (True, False): "trained, first", (False, True): "frozen",
             (False, False): "frozen, nothing below trains"}
    per_block = {names[k]: p.keeps[k] for k in dict.fromkeys(kinds)}
    return Plan(t, cfg.batch_size, cfg.seq_len, cfg.grad_checkpointing, moments, sizes, per_block)


# ----------------------------------------------------------------------------------------------------------
# The verdict: does it fit, and if not, the smallest change that makes it fit


def fitting_changes(t: Target, c: Census, runtime: tuple[int, int], probes: dict,
                    limit: int) -> list[tuple[str, Plan]]:
    """Each single change of the run that makes its peak fit in `limit`, smallest first: checkpointing (the same
    training, a third more compute), a smaller micro-batch with more accumulation (the same training, slower),
    fewer LISA blocks at a time, more ranks, a shorter --seq-len (changes the data). Within each, the
    least change that fits."""
    cfg = t.cfg
    def replan(**changes) -> Plan:
        return plan_step(dataclasses.replace(t, cfg=dataclasses.replace(cfg, **changes)), c, runtime, probes)
    found = []
    if not cfg.grad_checkpointing:
        p = replan(grad_checkpointing=True)
        if p.total <= limit:
            found.append(("--grad-checkpointing", p))
    b = cfg.batch_size
    while b > 1:
        b //= 2
        p = replan(batch_size=b, grad_accum=cfg.grad_accum * cfg.batch_size // b)
        if p.total <= limit:
            found.append((f"--batch-size {b} --grad-accum {cfg.grad_accum * cfg.batch_size // b}", p))
            break
    if cfg.method == "lisa":
        for g in range(cfg.lisa_layers - 1, -1, -1):
            p = replan(lisa_layers=g)
            if p.total <= limit:
                found.append((f"--lisa-layers {g}", p))
                break
    for n in (2 ** i for i in range(1, 11)):
        if n > t.world_size:
            p = plan_step(dataclasses.replace(t, world_size=n, parallel=t.parallel or "fsdp"), c, runtime, probes)
            if p.total <= limit:
                found.append((f"{n} ranks (torchrun --nproc_per_node / --nnodes)", p))
                break
    seq = cfg.seq_len
    while seq > 64:
        seq //= 2
        p = replan(seq_len=seq)
        if p.total <= limit:
            found.append((f"--seq-len {seq}", p))
            break
    return found


def verdict(plan: Plan, limit: int, changes: list[tuple[str, Plan]]) -> str:
    """One line: fits or not, and the smallest change that would make it fit."""
    used = f"{gib(plan.total)} of {gib(limit)}"
    if plan.total <= limit:
        return f"fits: {used} ({100 * plan.total / limit:.0f}%)"
    if changes:
        change, p = changes[0]
        return f"does not fit: {used}; the smallest change that fits: {change} ({gib(p.total)})"
    step = max(sum(v.values()) for m, v in plan.moments.items() if m != "loading")
    floor = sum(plan.moments["optimizer"][k] for k in ("runtime", "weights", "optimizer"))
    if plan.peak == "loading":
        why = (f"loading alone needs {gib(sum(plan.moments['loading'].values()))} (the fp32 weights this process "
               f"holds and one checkpoint tensor as read); the training step itself needs {gib(step)}")
    elif floor > limit:
        why = f"the process, the fp32 weights and AdamW's state alone need {gib(floor)}"
    else:
        why = f"the peak is in {plan.peak}; combine changes and plan again"
    return f"does not fit: {used}; no single change of checkpointing, batch, gamma, world size or seq fits: {why}"


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n < 100 * GiB else f"{n / GiB:.0f} GiB"


def parse_memory(text: str | None) -> int | None:
    """--device-memory: 80GB, 80GiB, 81920MB, 1.5TB (GB and GiB both 2**30 bytes, as GPU memory is quoted)."""
    if text is None:
        return None
    units = {"t": 2**40, "g": 2**30, "m": 2**20, "k": 2**10}
    s = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        value = float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--device-memory {text!r}: give a size such as 80GB, 24GiB or 81920MB")
    return int(value)


def device_memory(t: Target, given: int | None) -> tuple[int, str]:
    """The memory the plan is compared with, and where that figure comes from."""
    if given is not None:
        return given, "--device-memory"
    if t.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1], torch.cuda.get_device_name()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


# ----------------------------------------------------------------------------------------------------------
# train.py --dry-run


def dry_run(cfg: TrainConfig, world_size: int | None, memory: str | None, as_json: bool) -> dict:
    """Plan the run train.py would make with cfg, print it (rank 0 under torchrun) and return it as a dict.
    Reads config.json only; writes nothing."""
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if world_size is not None and world_size < 1:
        raise UserError(f"--world-size must be >= 1, got {world_size}")
    if world_size is not None and launched > 1 and world_size != launched:
        raise UserError(f"--world-size {world_size} disagrees with torchrun's {launched} processes: give one")
    cfg = cfg.with_defaults()
    dataclasses.replace(cfg, device=None).validate()  # a GPU run can be planned on a machine without one
    limit = parse_memory(memory)
    t = target(cfg, world_size or launched, limit)
    c = census(t)
    runtime = runtime_bytes(t)
    probes: dict = {}
    plan = plan_step(t, c, runtime, probes)
    flipped = dataclasses.replace(cfg, grad_checkpointing=not cfg.grad_checkpointing)
    other = plan_step(dataclasses.replace(t, cfg=flipped), c, runtime, probes)  # activations the other way
    limit, source = device_memory(t, limit)
    changes = fitting_changes(t, c, runtime, probes, limit) if plan.total > limit else []
    line = verdict(plan, limit, changes)
    result = {"total_bytes": plan.total, "components": plan.components, "peak": plan.peak,
              "moments": plan.moments, "sizes": plan.sizes, "activations_per_block": plan.per_block,
              "per_rank": True, "world_size": t.world_size,
              "parallel": t.parallel, "device": t.device, "device_memory_bytes": limit,
              "device_memory_from": source, "fits": plan.total <= limit, "verdict": line,
              "grad_checkpointing": cfg.grad_checkpointing,
              "total_bytes_with_grad_checkpointing": (other if not cfg.grad_checkpointing else plan).total,
              "total_bytes_without_grad_checkpointing": (plan if not cfg.grad_checkpointing else other).total,
              "fitting_changes": {change: p.total for change, p in changes}}
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result) if as_json else table(plan, other, c, line, limit, source))
    return result


def describe(t: Target, c: Census, plan: Plan) -> str:
    """The first line of the table: what is planned."""
    cfg, L = t.cfg, len(c.blocks)
    method = {"lisa": f"LISA, {cfg.lisa_layers} of {L} blocks at a time", "full": f"full fine-tuning, {L} blocks",
              "lora": f"LoRA r={cfg.lora_r} ({cfg.lora_targets}), {L} blocks"}[cfg.method]
    precision = str(t.mp or t.amp or torch.float32).removeprefix("torch.")
    how = f"FSDP2 mixed precision {precision}" if t.mp else (f"autocast {precision}" if t.amp else "fp32")
    ranks = f"{t.world_size} ranks ({t.parallel})" if t.world_size > 1 else "1 process"
    accum = f", grad-accum {cfg.grad_accum}" if cfg.grad_accum > 1 else ""
    return (f"--dry-run: {method}; {t.model.model_type}, {c.base_params / F32 / 1e9:.2f}B parameters; "
            f"micro-batch {plan.batch} x {plan.seq} tokens{accum}; "
            f"{how}; {ranks} on {t.device}; per rank")


def table(plan: Plan, other: Plan, c: Census, line: str, limit: int, source: str) -> str:
    """The per-rank table: each component at the peak and at its largest, the moments, the verdict."""
    t, cfg = plan.target, plan.target.cfg
    ckpt = "with" if not plan.grad_checkpointing else "without"
    trained = {"lisa": f"embedding, head, {cfg.lisa_layers} blocks", "lora": "adapters",
               "full": "every weight"}[cfg.method]
    sharded = f", / {t.shards} ranks" if t.shards > 1 else ""
    labels = {
        "runtime": "the process" + (" (measured)" if t.device == "cpu" or torch.cuda.is_available() else
                                    " (CUDA context, estimated)"),
        "loading": "the checkpoint while it loads",
        "weights": f"fp32 master weights{sharded}",
        "gradients": f"fp32, {trained}{sharded}",
        "optimizer": f"AdamW m, v, {trained}{sharded}",
        "activations": f"1 micro-batch ({ckpt} --grad-checkpointing: {gib(other.sizes['activations'])}); a block "
                       + ", ".join(f"{kind}: {gib(b)}" for kind, b in plan.per_block.items()),
        "loss": f"fused linear + cross-entropy, V={c.head[0]}" +
                (f", split by vocabulary over {t.shards} ranks" if head_splits(t, c) else ""),
        "temporaries": "backward, AdamW step" + (", FSDP buffers" if t.parallel == "fsdp" else ""),
        "checkpoint": "writing a resume checkpoint (--save-every)",
    }
    rows = [describe(t, c, plan), f"{'component':<12} {'at the peak':>12} {'largest':>12}  what"]
    for k in COMPONENTS:
        at = plan.components[k]
        rows.append(f"{k:<12} {gib(at) if at else '-':>12} {gib(plan.sizes[k]):>12}  {labels[k]}")
    rows.append(f"{'total':<12} {gib(plan.total):>12} {'':>12}  peak in {plan.peak}; "
                + ", ".join(f"{m} {gib(sum(v.values()))}" for m, v in plan.moments.items()))
    rows.append(f"memory: {gib(limit)} ({source}); {line}")
    return "\n".join(rows)
