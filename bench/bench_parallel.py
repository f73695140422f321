#!/usr/bin/env python3
"""Per-rank memory and speed of multi-process training: FSDP2 and DDP, LISA and full, against one rank.

The twin of bench_train.py for several processes: the same random Llama-shaped model, nanolisa's AdamW,
LISA and the loss, made data-parallel by nanolisa/parallel.py exactly as the trainer does it (FSDP2: one
unit per block, the embedding, norm + head, the root; DDP: rebuilt at each LISA switch). Every rank
trains on its own batch of the per-rank size, so activations per rank are those of the 1-rank run and the
difference is what sharding saves. Each rank prints one JSON line: its peak resident set and tokens/s.

Usage (1 rank, then 2 ranks; every row of bench/RESULTS.md's multi-process table is one such run):
  .venv/bin/python bench/bench_parallel.py --mode lisa $SHAPE
  .venv/bin/torchrun --standalone --nproc_per_node 2 bench/bench_parallel.py --mode lisa --parallel fsdp $SHAPE
  .venv/bin/python bench/bench_parallel.py --all $SHAPE      # the whole table, one configuration at a time
with SHAPE e.g. "--layers 12 --hidden 768 --ffn 2048 --heads 12 --kv-heads 12 --vocab 320 --batch 4 --seq 512".
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.bench_train import PeakRSS, bench_model  # noqa: E402
from nanolisa.adamw import AdamW  # noqa: E402
from nanolisa.lisa import LISA  # noqa: E402
from nanolisa.loss import next_token_nll  # noqa: E402
from nanolisa.parallel import close_world, gather, init_world, replicate, shard  # noqa: E402
from nanolisa.runtime import return_freed_memory_to_os  # noqa: E402
from nanolisa.trainer import param_groups  # noqa: E402

MB = 1024 * 1024


def run(a: argparse.Namespace) -> None:
    return_freed_memory_to_os()  # as train.py does at start-up
    torch.set_num_threads(a.threads)
    world, device = init_world("cpu")
    torch.manual_seed(0)
    model = bench_model(a)
    lisa = LISA(model, n_layers=1, interval=a.interval, seed=0) if a.mode == "lisa" else None
    if world.distributed and a.parallel == "fsdp":
        shard(model)
    opt = AdamW(param_groups(model, 0.0), lr=1e-4, weight_decay=0.0)
    ddp = None
    peaks = PeakRSS()
    torch.manual_seed(world.rank)
    for step in range(a.steps):
        switched = lisa.maybe_switch(step, opt) if lisa else False
        if world.distributed and a.parallel == "ddp" and (ddp is None or switched):
            ddp = replicate(model, first=ddp is None)
        if step == 1:
            t0 = time.perf_counter()
        ids = torch.randint(0, a.vocab, (a.batch, a.seq))  # (B, T): this rank's batch
        (next_token_nll(ddp or model, ids, ids).sum() / ids.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.end_step()
    dt = time.perf_counter() - t0
    label = f"{a.parallel}x{world.world_size}" if world.distributed else "1 rank"
    row = {"mode": a.mode, "parallel": label, "rank": world.rank, "peak_rss_mb": round(peaks.process),
           "tokens_per_s_per_rank": round(a.batch * a.seq * (a.steps - 1) / dt, 1)}
    rows = gather(row, world)  # rank 0 prints every rank's line: their stdout would interleave
    if world.is_main:
        for r in rows:
            print(json.dumps(r), flush=True)
    close_world()


def run_all(a: argparse.Namespace, shape: list[str]) -> None:
    """Every configuration, one after the other; prints the table rows."""
    py = sys.executable
    me = os.path.abspath(__file__)
    rows = []
    modes = a.modes.split(",")
    for mode in modes:
        for launch in (["1"], ["fsdp"], ["ddp"]):
            cmd = [py, me, "--mode", mode, *shape] if launch == ["1"] else \
                [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", me, "--mode", mode,
                 "--parallel", launch[0], *shape]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                sys.exit(p.stderr[-2000:])
            rows += [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
            print(rows[-1], file=sys.stderr, flush=True)
    print("| mode | run | peak RSS per rank (MB) | vs 1 rank | tokens/s per rank | tokens/s in all |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode in modes:
        ref = next(r for r in rows if r["mode"] == mode and r["parallel"] == "1 rank")
        for label in ("1 rank", "fsdpx2", "ddpx2"):
            rs = [r for r in rows if r["mode"] == mode and r["parallel"] == label]
            peak = max(r["peak_rss_mb"] for r in rs)
            speed = min(r["tokens_per_s_per_rank"] for r in rs)
            print(f"| {mode} | {label} | {peak} | {peak / ref['peak_rss_mb']:.2f}x | {speed} | {speed * len(rs):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["full", "lisa"], default="lisa")
    ap.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="under torchrun")
    ap.add_argument("--all", action="store_true", help="run the whole table (1 rank, FSDP x2, DDP x2; LISA, full)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4, help="per rank")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--interval", type=int, default=1, help="LISA: steps between switches")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute each block's activations in "
                    "backward, as train.py --grad-checkpointing")
    ap.add_argument("--modes", default="lisa,full", help="with --all: the modes to run (default: %(default)s)")
    a = ap.parse_args()
    if a.all:
        shape = [x for f in ("layers", "hidden", "ffn", "heads", "kv_heads", "vocab", "batch", "seq", "steps",
                             "interval", "threads") for x in (f"--{f.replace('_', '-')}", str(getattr(a, f)))]
        shape += ["--grad-checkpointing"] if a.grad_checkpointing else []
        run_all(a, shape)
    else:
        run(a)


if __name__ == "__main__":
    main()
