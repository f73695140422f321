#!/usr/bin/env python3
"""The memory planner against real runs: `train.py --dry-run --json` beside the measured peak resident set of
the same `train.py` command, on CPU (tests/test_plan.py checks the same within 15%).

Each row: a random model of one of SHAPES written as a Hugging Face directory (random weights, the built-in
tiny byte tokenizer), text data long enough that every row is --seq-len tokens, then
  planned   `train.py --dry-run --json <flags>` -> total_bytes (the planned peak per rank)
  measured  `train.py <flags>` run to the end -> ru_maxrss of the process (with torchrun: of the launcher and
            its ranks, i.e. the largest rank's; wait4's resource usage includes the waited-for children),
            started from a small launcher (see LAUNCHER)

Usage:
  .venv/bin/python bench/bench_plan.py                 # every method x checkpointing x shape, and FSDP x2
  .venv/bin/python bench/bench_plan.py --only llama-32k:lisa
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 2**20

# name -> config.json fields, checkpoint dtype, and the run's micro-batch (batch, seq). One shape with Llama-2's
# 32000 vocabulary (weights and the loss weigh most), one GPT-2 (tied embeddings, LayerNorm, biases) whose
# activations weigh most, and a weight-heavy Llama for the 2-rank FSDP run, whose peak today is loading:
# every rank loads the whole fp32 model from its bf16 checkpoint before FSDP shards it. (Its tensors have
# at most 2**22 elements: AdamW's 16 MB slicing of larger FSDP2 shards is being fixed in main.)
SHAPES = {
    "llama-32k": (dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=4096), "bfloat16", (1, 512)),
    "gpt2-act": (dict(model_type="gpt2", vocab_size=1024, n_embd=384, n_inner=1536, n_layer=6, n_head=6,
                      n_positions=1024), "float32", (4, 512)),
    "llama-wide": (dict(model_type="llama", vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                        num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=4096), "bfloat16", (1, 128)),
}
METHODS = {"full": ["--method", "full"], "lora": ["--method", "lora"],
           "lisa": ["--method", "lisa", "--lisa-layers", "1"]}
QUICK = ["--steps", "2", "--eval-every", "0", "--save-every", "0", "--no-plot", "--quiet", "--warmup", "0"]


def make_model(out: str, shape: str) -> str:
    """A random model of SHAPES[shape] as a Hugging Face directory in out (once)."""
    import torch

    from nanolisa.config import ModelConfig
    from nanolisa.model import build_model
    from nanolisa.presets import ASSETS
    from nanolisa.pretrained import save_pretrained
    from nanolisa.tokenizer import load_tokenizer
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    fields, dtype, _ = SHAPES[shape]
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf({**fields, "torch_dtype": dtype}))
    model.init_weights()
    save_pretrained(model, load_tokenizer(os.path.join(ASSETS, "tiny")), out, dtype=dtype)
    return out


def make_data(path: str, n: int = 64) -> str:
    """text_only records of ~2400 bytes: with the byte tokenizer every row is truncated to --seq-len."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "apple"]
    with open(path, "w") as f:
        json.dump({"type": "text_only", "instances": [{"text": " ".join(rng.choice(words) for _ in range(400))}
                                                      for _ in range(n)]}, f)
    return path


def train_cmd(args: list[str], nproc: int = 1) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return [sys.executable, *launcher, os.path.join(ROOT, "train.py"), *args]


def env(nproc: int) -> dict:
    e = {**os.environ, "PYTHONPATH": ROOT}
    if nproc > 1:
        e["OMP_NUM_THREADS"] = "1"
    return e


# Runs a command and writes its peak resident set (KiB) to a file. A process started by a large one (pytest, or
# this script once it has built a model) inherits the parent's high-water mark: Linux records the old address
# space's peak in the child's ru_maxrss when it calls exec, and subprocess's vfork shares the parent's. So
# the command is started from this small launcher, whose own address space is new, and the launcher reports
# the command's own peak (with torchrun: of the launcher and its ranks, i.e. the largest rank's).
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))")


def run_measured(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, int]:
    """Run cmd (through LAUNCHER), capturing its output; returns it and the command's peak resident set in bytes."""
    with tempfile.NamedTemporaryFile("r") as peak:
        p = subprocess.run([sys.executable, "-c", LAUNCHER, peak.name, *cmd], capture_output=True, text=True, **kw)
        return p, int(peak.read() or 0) * 1024  # KiB on Linux


def measure(args: list[str], nproc: int = 1) -> int:
    """The peak resident set (bytes) of `train.py args` (with nproc ranks under torchrun: the largest rank's)."""
    p, peak = run_measured(train_cmd(args, nproc), cwd=ROOT, env=env(nproc))
    if p.returncode:
        raise RuntimeError(f"train.py {' '.join(args)} failed: {p.stderr[-2000:]}")
    return peak


def planned(args: list[str], nproc: int = 1) -> dict:
    """`train.py --dry-run --json args --world-size nproc` as a dict."""
    p = subprocess.run(train_cmd([*args, "--dry-run", "--json", "--world-size", str(nproc)]), cwd=ROOT,
                       env=env(nproc), capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"train.py --dry-run {' '.join(args)} failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout)


def run_args(model: str, data: str, out: str, shape: str, method: str, ckpt: bool, extra=()) -> list[str]:
    batch, seq = SHAPES[shape][2]
    return ["--model", model, "--data", data, "--out", out, *METHODS[method], "--batch-size", str(batch),
            "--seq-len", str(seq), *QUICK, *(["--grad-checkpointing"] if ckpt else []), *extra]


# (shape, method, --grad-checkpointing, processes, more flags): every row of the table
CASES = [(s, m, ck, 1, []) for s in ("llama-32k", "gpt2-act") for m in METHODS for ck in (False, True)]
CASES += [("llama-32k", "lisa", False, 1, ["--save-every", "1"]),  # writes a resume checkpoint after step 1
          ("llama-wide", "lisa", False, 2, ["--threads", "1"])]  # 2 ranks, FSDP2


def rows(only: str | None, work: str):
    """(label, the plan, measured bytes, seconds, args) of each case."""
    data = make_data(os.path.join(work, "data.json"))
    for shape, method, ckpt, nproc, extra in CASES:
        label = f"{shape}:{method}" + ("+ckpt" if ckpt else "") + (f" fsdp x{nproc}" if nproc > 1 else "") + \
            (" " + " ".join(extra) if extra and nproc == 1 else "")
        if only and not label.startswith(only):
            continue
        model = make_model(os.path.join(work, shape), shape)
        args = run_args(model, data, os.path.join(work, f"out-{len(os.listdir(work))}"), shape, method, ckpt, extra)
        plan = planned(args, nproc)
        t0 = time.time()
        peak = measure(args, nproc)
        yield label, plan, peak, time.time() - t0, args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="only the rows whose label starts with this, e.g. llama-32k:lisa")
    a = ap.parse_args()
    print("| run | planned MiB | measured peak RSS MiB | planned / measured | planned peak moment |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as work:
        for label, plan, peak, seconds, args in rows(a.only, work):
            total = plan["total_bytes"]
            print(f"| {label} | {total / MiB:.0f} | {peak / MiB:.0f} | {total / peak:.3f} | {plan['peak']} |",
                  flush=True)


if __name__ == "__main__":
    main()
