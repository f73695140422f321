"""torch.compile per transformer block (train.py --compile), as torchtitan's parallelize() orders it: after
activation checkpointing (activation_memory.py), before FSDP2 shards the blocks.

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


def compile_blocks(model: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each of model.blocks in place (dynamic shapes after a first change of length)."""
    for block in model.blocks:
        block.compile(backend=backend)
