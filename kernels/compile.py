"""torch.compile per transformer block (train.py --compile), as torchtitan's parallelize() orders it: after
activation checkpointing (activation_memory.py), before FSDP2 shards the blocks; and AdamW's step per tensor.

Each block is compiled in place (nn.Module.compile: state-dict keys keep no `_orig_mod.` segment). The
blocks share one code object, and with torch's default inlining of nn.Modules their parameters are graph
inputs, not constants, so all blocks of one kind share graphs. LISA flips requires_grad at every switch,
and a graph is specialised on which inputs need a gradient: each block kind compiles once per trainable
state (trained, frozen; block 0, whose input is the embedding's output, may differ once more), a bounded
number however many switches a run makes (tests/test_kernels.py counts them with torch._dynamo's
counters over 12 switches). Without that bound, torch would recompile until its recompile_limit (8) and
then silently run the block eagerly.

Whether it pays depends on the machine: inductor fuses the elementwise work between the matmuls (norms,
RoPE, the gated activation, residual adds), which matters on a GPU, and little on a CPU where the matmuls
dominate; the first steps pay the compilation (about a minute per graph on a busy CPU).
"""
from __future__ import annotations

import torch

from nanolisa.adamw import AdamW, update_tensor_


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each of model.blocks in place (dynamic shapes after a first change of length)."""
    for block in model.blocks:
        block.compile(backend=backend)


def compile_adamw(optimizer: AdamW, backend: str = "inductor") -> None:
    """torch.compile AdamW's step, one tensor at a time (nanolisa/adamw.py `update_tensor_`).

    The foreach step makes eight passes over a tensor's memory (p, m and v read and written, a temporary for
    the denominator); compiled, each tensor's step is one fused loop. That is what an optimizer step costs on
    a CPU or GPU, bound by memory: about 3x faster on a 2-core CPU (0.18 -> 0.06 s for LISA's 78M trainable
    parameters at vocabulary 32000; bench/RESULTS.md). dynamic=True: one graph serves every tensor size; the
    scalars that change each step arrive as a tensor, so they cause no recompilation either. Not
    bit-identical to the foreach path (a different order of float operations: within rounding, tested
    against torch.optim.AdamW), but it computes each element alike wherever it sits in a tensor, so a
    sharded tensor takes the same step as the whole one."""
    optimizer.update_tensor = torch.compile(update_tensor_, dynamic=True, fullgraph=True, backend=backend)
