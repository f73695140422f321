"""Resume checkpoints: everything a bit-exact continuation of an interrupted run needs.

A resume checkpoint is a directory `--out/checkpoints/step-NNNNNNN/` (not to be confused with the Hugging
Face model directory a finished run writes, nor with activation checkpointing) holding, in safetensors and
JSON only (no pickle is ever written or read):

  weights.safetensors     the trainable weights (all weights for full and LISA; the adapters for LoRA)
  optimizer.safetensors   the AdamW state, keyed "<parameter name>::<exp_avg|exp_avg_sq|step>"
  rng.safetensors         torch's CPU (and CUDA) generator states
  trainer_state.json      the step, the run's settings, the data order and position, LISA's sampler and
                          Python's RNG

It is written to a temporary directory and renamed into place, so a run killed at any moment resumes from
the last complete one. Only the newest KEEP are kept; a finished run removes them all.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import torch
from safetensors.torch import load_file, save_file

from nanolisa.errors import UserError
from nanolisa.files import read_json, staging_dir
from nanolisa.train_config import RESUMABLE_CHANGES, TrainConfig

CHECKPOINTS = "checkpoints"  # under --out
KEEP = 2


def checkpoint_dirs(out: str) -> list[str]:
    """The complete resume checkpoints in --out, oldest first."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and
                   os.path.isfile(os.path.join(root, n, "trainer_state.json")))
    return [os.path.join(root, n) for n in names]


def find_resume_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix two different runs in --out."""
    ckpts = checkpoint_dirs(cfg.out)
    if not ckpts:
        return None
    if not cfg.resume:
        raise UserError(f"{cfg.out} already holds a run's checkpoints: pass --resume to continue it, "
                        f"or choose another --out")
    saved = read_json(os.path.join(ckpts[-1], "trainer_state.json"))["config"]
    now = dataclasses.asdict(cfg)
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{cfg.out} holds a run with different settings ({k}: {saved.get(k)!r} there, "
                        f"{now[k]!r} now); use the same flags to resume, or another --out")
    return ckpts[-1]


def save_checkpoint(out: str, step: int, model, optimizer, lisa, batches, cfg: TrainConfig) -> str:
    """Write the resume checkpoint of `step`; returns its directory."""
    final = os.path.join(out, CHECKPOINTS, f"step-{step:07d}")
    names = {p: n for n, p in model.named_parameters()}
    with staging_dir(final, prefix=".tmp-step-") as tmp:
        weights = {n: p.detach().clone() for p, n in names.items() if p.requires_grad or cfg.method != "lora"}
        save_file(weights, os.path.join(tmp, "weights.safetensors"))
        opt = {f"{names[p]}::{k}": v.detach().clone() for p, s in optimizer.state.items() for k, v in s.items()}
        save_file(opt, os.path.join(tmp, "optimizer.safetensors"))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():  # LoRA dropout on a GPU draws from the CUDA generator
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, os.path.join(tmp, "rng.safetensors"))
        state = {"step": step, "config": dataclasses.asdict(cfg), "data": batches.state_dict(),
                 "lisa": lisa.state_dict() if lisa else None, "python_rng": _to_lists(random.getstate())}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, model, optimizer, lisa, batches) -> int:
    """Restore everything save_checkpoint wrote into the live objects; returns the step to continue from."""
    state = read_json(os.path.join(path, "trainer_state.json"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(os.path.join(path, "weights.safetensors")).items():
            params[n].copy_(t)
    if lisa:
        lisa.load_state_dict(state["lisa"], optimizer)
    optimizer.state.clear()
    for key, t in load_file(os.path.join(path, "optimizer.safetensors")).items():
        n, k = key.split("::")
        optimizer.state[params[n]][k] = t.to(params[n].device) if k != "step" else t
    batches.load_state_dict(state["data"])
    rng = load_file(os.path.join(path, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_to_tuples(state["python_rng"]))
    return int(state["step"])


def remove_checkpoints(out: str) -> None:
    """A finished run's checkpoints have done their job."""
    shutil.rmtree(os.path.join(out, CHECKPOINTS), ignore_errors=True)


def _to_lists(x):  # Python's RNG state is nested tuples; JSON has lists
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
