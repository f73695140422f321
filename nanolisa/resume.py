"""Resume checkpoints: everything a bit-exact continuation of an interrupted run needs.

A resume checkpoint is a directory `--out/checkpoints/step-NNNNNNN/` (not to be confused with the Hugging
Face model directory a finished run writes, nor with activation checkpointing). It holds safetensors and
JSON only; no pickle is ever written or read:

  *.safetensors           the trainable weights (all weights for full and LISA; the adapters for LoRA) and
                          the AdamW state, written by torch.distributed.checkpoint (DCP) in safetensors
                          files: with several ranks each rank writes its own shard, in parallel
  rng-rank<R>.safetensors each rank's torch CPU (and CUDA) generator state
  trainer_state.json      the step, the run's settings, the world size, the data position, LISA's sampler,
                          which parameters have AdamW state, and Python's RNG

It is written to a temporary directory (`.tmp-step-*`) and renamed into place once every rank has
finished, so a run killed at any moment never leaves a checkpoint that --resume would pick. Before a
checkpoint is used it is checked (`check_checkpoint`): a damaged newest one is skipped, with a notice, for
the newest intact one. Only the newest KEEP are kept; a finished run removes them all.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import struct
import sys
import warnings
from contextlib import contextmanager

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from nanolisa.errors import UserError
from nanolisa.files import new_staging_dir, read_json, umask_mode, write_failure
from nanolisa.parallel import World, barrier, broadcast
from nanolisa.train_config import RESUMABLE_CHANGES, TrainConfig

CHECKPOINTS = "checkpoints"  # under --out
KEEP = 2
STATE = "trainer_state.json"


def checkpoint_dirs(out: str) -> list[str]:
    """The completed resume checkpoints in --out, oldest first (temporary directories are not listed)."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and
                   os.path.isfile(os.path.join(root, n, STATE)))
    return [os.path.join(root, n) for n in names]


def _tensors(model, optimizer, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """What DCP saves and loads in place: weights, and the AdamW state of the parameters that have one.
    Detached views share storage with the live tensors, so loading writes straight into the model."""
    names = {p: n for n, p in model.named_parameters()}
    out = {f"weight/{n}": p.detach() for p, n in names.items() if p.requires_grad or cfg.method != "lora"}
    for p, state in optimizer.state.items():
        out.update({f"adamw/{names[p]}/{k}": v for k, v in state.items()})
    return out


def save_checkpoint(out: str, step: int, model, optimizer, lisa, batches, cfg: TrainConfig, world: World) -> str:
    """Write the resume checkpoint of `step` (every rank calls this together); returns its directory."""
    final = os.path.join(out, CHECKPOINTS, f"step-{step:07d}")
    names = {p: n for n, p in model.named_parameters()}
    tmp = broadcast(new_staging_dir(os.path.join(out, CHECKPOINTS), ".tmp-step-") if world.is_main else None, world)
    try:
        with _quiet_single_process():
            dcp.save(_tensors(model, optimizer, cfg), no_dist=not world.distributed,
                     storage_writer=dcp.HuggingFaceStorageWriter(tmp, save_distributed=world.distributed))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # LoRA dropout on a GPU draws from the CUDA generator
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, os.path.join(tmp, f"rng-rank{world.rank}.safetensors"))
        umask_mode(os.path.join(tmp, f"rng-rank{world.rank}.safetensors"))
        if world.is_main:
            state = {"step": step, "config": dataclasses.asdict(cfg), "world_size": world.world_size,
                     "data": batches.state_dict(), "lisa": lisa.state_dict() if lisa else None,
                     "adamw": sorted(names[p] for p in optimizer.state), "python_rng": _to_lists(random.getstate())}
            with open(os.path.join(tmp, STATE), "w") as f:
                json.dump(state, f)
        barrier(world)  # every rank's files are complete before the rename makes the checkpoint visible
        if world.is_main:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in checkpoint_dirs(out)[:-KEEP]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (OSError, CheckpointException, SafetensorError)):
            raise write_failure(f"the checkpoint {final}", e) from None
        raise
    barrier(world)
    return final


def load_checkpoint(path: str, model, optimizer, lisa, batches, world: World) -> int:
    """Restore everything save_checkpoint wrote into the live objects; returns the step to continue from."""
    state = read_json(os.path.join(path, STATE))
    if state.get("world_size", 1) != world.world_size:
        raise UserError(f"{path} was written by {state.get('world_size', 1)} rank(s), this run has "
                        f"{world.world_size}: resume with the same number of processes (torchrun "
                        f"--nproc_per_node / --nnodes), so that the global batches stay the same")
    if lisa:
        lisa.load_state_dict(state["lisa"], optimizer)  # the active blocks train again, the rest is frozen
    params = dict(model.named_parameters())
    optimizer.state.clear()
    for n in state["adamw"]:  # empty AdamW state of the right shapes (and shards), filled by dcp.load
        p = params[n]
        optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    with torch.no_grad(), _quiet_single_process():
        dcp.load(_tensors(model, optimizer, TrainConfig(**state["config"])), no_dist=not world.distributed,
                 storage_reader=dcp.HuggingFaceStorageReader(path))
    batches.load_state_dict(state["data"])
    rng = load_file(os.path.join(path, f"rng-rank{world.rank}.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_to_tuples(state["python_rng"]))
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------
# Choosing and checking the checkpoint to resume from


def find_resume_checkpoint(cfg: TrainConfig, world: World) -> str | None:
    """The newest intact checkpoint to resume from, or None for a fresh run. Refuses to mix two different
    runs in --out; skips damaged checkpoints with a one-line notice each."""
    ckpts = checkpoint_dirs(cfg.out)
    if not ckpts:
        return None
    if not cfg.resume:
        raise UserError(f"{cfg.out} holds an unfinished run's checkpoints: pass --resume to continue it, "
                        f"or choose another --out")
    for path in reversed(ckpts):
        problem = check_checkpoint(path, world)
        if problem is None:
            break
        if world.is_main:
            print(f"note: skipping {path}: {problem}", file=sys.stderr)
    else:
        raise UserError(f"{cfg.out}: no intact checkpoint to resume from ({len(ckpts)} damaged); start a new run "
                        f"in another --out")
    saved = read_json(os.path.join(path, STATE))["config"]
    now = dataclasses.asdict(cfg)
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{cfg.out} holds a run with different settings ({k}: {saved.get(k)!r} there, "
                        f"{now[k]!r} now); use the same flags to resume, or another --out")
    return path


def check_checkpoint(path: str, world: World) -> str | None:
    """What is wrong with a checkpoint directory, or None if it looks intact: its state file parses and has
    every field, every rank's RNG file is there, and every safetensors file is as long as its header says
    (a truncated or missing file is the usual damage of a full disk or a killed copy)."""
    try:
        state = read_json(os.path.join(path, STATE))
        missing = [k for k in ("step", "config", "world_size", "data", "lisa", "adamw", "python_rng") if k not in state]
        if missing:
            return f"{STATE} lacks {missing}"
        TrainConfig(**state["config"])
    except (UserError, TypeError, AttributeError) as e:
        return f"unreadable {STATE} ({e})"
    ranks = state["world_size"] if isinstance(state["world_size"], int) else 0
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    for r in range(ranks):
        if f"rng-rank{r}.safetensors" not in files:
            return f"rng-rank{r}.safetensors is missing"
    if not any(not f.startswith("rng-") for f in files):
        return "its weights are missing"
    for f in files:
        problem = _safetensors_problem(os.path.join(path, f))
        if problem:
            return f"{f} {problem}"
    return None


def _safetensors_problem(path: str) -> str | None:
    """None if the file's size matches its header, else what is wrong."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                return "is truncated"
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError):
        return "has no readable header"
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    return None if size == 8 + n + end else f"is {size} bytes, its header says {8 + n + end}"


@contextmanager
def _quiet_single_process():
    """DCP warns on every call in a single process that it assumes one: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def remove_checkpoints(out: str) -> None:
    """A finished run's checkpoints have done their job."""
    shutil.rmtree(os.path.join(out, CHECKPOINTS), ignore_errors=True)


def _to_lists(x):  # Python's RNG state is nested tuples; JSON has lists
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
