"""Loading a model straight into FSDP2 shards: each rank reads only its own rows of the checkpoint.

Loading the whole model on every rank and sharding it afterwards (what nanolisa did first) makes the load
the peak of every rank: a 70B model is 280 GB in fp32, on each GPU, before sharding. Instead, as torchtitan
and torchtune do:

  1. build the model on the meta device (shapes only, no memory);
  2. prepare it as the run wants it (kernels, LISA's or LoRA's trainable set; LoRA adds its adapters, on
     meta too) and shard it with FSDP2 (nanolisa/parallel.py `shard`), still on meta;
  3. `to_empty`: each rank allocates its own shard of every parameter, nothing else;
  4. fill each shard from the checkpoint: safetensors reads a range of rows (`get_slice`), so a rank reads
     only the bytes of its rows, one tensor at a time.

Nothing is randomly initialised only to be overwritten. What the checkpoint does not hold is made as the
one-process load makes it: LoRA's A from the same seeded generator (the full (r, in) matrix, small, then
this rank's rows), B = 0, DoRA's magnitude from this rank's rows of W; a built-in preset's random weights
from its seed. So the result equals the one-process load bit for bit (tests/test_distributed.py).

FSDP2 shards dimension 0 of every parameter over the ranks as torch.chunk does: rank r holds rows
[r * c, (r + 1) * c) of N, with c = ceil(N / world_size), clipped to N (so the last ranks may hold fewer
rows, or none). A GPT-2 Conv1D weight is stored transposed, so its rows are the checkpoint's columns.

While loading, a rank holds its shards, at most one checkpoint tensor's rows in the checkpoint's dtype,
and the process itself.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn

from nanolisa.config import read_config
from nanolisa.errors import UserError
from nanolisa.lora import init_lora_A, lora_modules
from nanolisa.model import CausalLM, build_model
from nanolisa.parallel import World, all_sum, chunk_rows, init_while_trainable, is_sharded, local, shard
from nanolisa.presets import PRESETS, load_preset
from nanolisa.pretrained import Stored, check_fits_in_memory, match_checkpoint, read_generation_config
from nanolisa.tokenizer import load_tokenizer


def load_sharded(path: str, device: torch.device, world: World, prepare: Callable[[CausalLM], Any],
                 mp_dtype: torch.dtype | None, seed: int) -> tuple[CausalLM, Any, Any]:
    """(model, tokenizer, what prepare returned): the model at `path` (a Hugging Face directory or a
    preset), prepared by `prepare(model)` on meta (kernels, the trainable set, LoRA's adapters), sharded
    by FSDP2 with mixed precision `mp_dtype`, each rank's shards filled in fp32, and FSDP2 initialised.
    `seed` is the seed the one-process load starts LoRA's initialisation from. Bad input fails on every
    rank with one line, before any rank waits for another."""
    if path in PRESETS and not os.path.isdir(path):
        whole, tokenizer = load_preset(path)  # a preset is small: its seeded random weights are the source
        stored = {n: (_whole(n, t), False) for n, t in whole.state_dict().items()}
        cfg, generation_config = whole.config, None
    else:
        tokenizer, cfg, generation_config = load_tokenizer(path), read_config(path), read_generation_config(path)
        # Each GPU holds 1 / world_size of the weights; CPU ranks on one host share its memory.
        check_fits_in_memory(cfg, torch.float32, device, path, 1 / world.world_size if device.type == "cuda" else 1)
    with torch.device("meta"):
        model = build_model(cfg)
    model.generation_config = generation_config
    prepared = prepare(model)
    if not (path in PRESETS and not os.path.isdir(path)):
        stored = match_checkpoint(path, model)  # every rank checks the files: all fail alike, at once
    shard(model, mp_dtype)
    model.to_empty(device=device)  # this rank's shard of every parameter, uninitialised
    failed = None
    try:
        fill(model, stored, world, seed)
    except UserError as e:
        failed = e
    if all_sum([float(failed is not None)], world, device)[0]:  # no rank goes on when one failed
        raise failed or UserError(f"rank {world.rank}: another rank could not read {path}; its error says why")
    model.config.dtype = "float32"
    init_while_trainable(model)
    return model, tokenizer, prepared


def _whole(name: str, t: torch.Tensor) -> Stored:
    return Stored(name, tuple(t.shape), lambda dim, a, b: t.narrow(dim, a, b - a) if t.dim() else t)


def rows_of(param: torch.Tensor, world: World) -> tuple[int, int]:
    """[start, stop) of dimension 0 that this rank holds of an FSDP2-sharded parameter (see above)."""
    return chunk_rows(param.shape[0], world.world_size, world.rank)


@torch.no_grad()
def fill(model: nn.Module, stored: dict[str, tuple[Stored, bool]], world: World, seed: int) -> None:
    """Write each rank's rows of every parameter: from the checkpoint, or (LoRA adapters) as they are
    initialised in one process."""
    for name, p in model.named_parameters():
        if name in stored:
            t, transposed = stored[name]
            _copy_rows(p, lambda a, b, t=t, tr=transposed: t.read(1, a, b).t() if tr else t.read(0, a, b), world)
    torch.manual_seed(seed)  # LoRA's A matrices draw from the generator in module order, as apply_lora does
    for m in lora_modules(model).values():
        a = init_lora_A(torch.empty(m.lora_A.weight.shape))  # (r, in): small, made whole on every rank
        _copy_rows(m.lora_A.weight, lambda i, j, a=a: a[i:j], world)
        local(m.lora_B.weight).zero_()
        if m.lora_magnitude_vector is not None:  # DoRA: ||W|| of each output row (B = 0), this rank's rows
            local(m.lora_magnitude_vector).copy_(torch.linalg.norm(local(m.weight), dim=1))
    model.tie_weights()


def _copy_rows(p: torch.Tensor, read: Callable[[int, int], torch.Tensor], world: World) -> None:
    """Fill this rank's part of p (all of it when p is not sharded) from read(start, stop), rows of the
    whole tensor."""
    mine = local(p)
    if not is_sharded(p) or p.dim() == 0:
        mine.copy_(read(0, p.shape[0]) if p.dim() else read(0, 0))
        return
    start, stop = rows_of(p, world)
    assert mine.shape[0] == stop - start, (tuple(mine.shape), start, stop)  # FSDP2 shards as rows_of says
    if stop > start:
        mine.copy_(read(start, stop))
