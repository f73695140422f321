#!/usr/bin/env python3
"""Per-rank memory of multi-process training, loading included: train.py on 2 ranks against 1 rank.

Each row is a real `train.py` run (under `torchrun --nproc_per_node 2` for the 2-rank rows) on a random
Llama checkpoint of the shape, written once as a Hugging Face directory (fp32): loading it, sharding it
(FSDP2 builds on the meta device and each rank reads only its rows; DDP and 1 rank load it whole),
training a few steps and writing the result. 2 ranks run with half the per-rank batch, so both rows
train on the same global batch. Measured: the peak resident set of the largest rank over the whole run
(its ru_maxrss, from a small launcher: see LAUNCHER), and tokens/s from the run's metrics.jsonl.

Shapes (--shape):
  weight-heavy  16 blocks x 1024, ffn 2816, vocab 32000: 270M parameters, 1.1 GB in fp32; 3 steps of
                4 x 64 tokens in all. Its peak is weights and AdamW state: what sharding divides.
  85m           12 blocks x 768, ffn 2048, vocab 320: 85M parameters; 3 steps of 4 x 512 tokens in all.
                Its peak is the activations of the batch, which sharding does not divide.

Usage:
  .venv/bin/python bench/bench_parallel.py --shape weight-heavy           # LISA and full, 1 rank / FSDP2 / DDP
  .venv/bin/python bench/bench_parallel.py --shape 85m --grad-checkpointing --modes lisa
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MB = 2**20
SHAPES = {  # config.json fields, global batch, sequence length
    "weight-heavy": (dict(num_hidden_layers=16, hidden_size=1024, intermediate_size=2816, vocab_size=32000,
                          num_attention_heads=16, num_key_value_heads=16), 4, 64),
    "85m": (dict(num_hidden_layers=12, hidden_size=768, intermediate_size=2048, vocab_size=320,
                 num_attention_heads=12, num_key_value_heads=12), 4, 512),
}
MODES = {"lisa": ["--method", "lisa", "--lisa-layers", "1", "--interval", "1"], "full": ["--method", "full"]}

# Runs a command and writes its peak resident set (KiB) to a file. The command is started from this small
# launcher, not from the bench itself: a child of a large process would inherit that process's high-water
# mark in ru_maxrss. wait4's usage covers the command and every child it waited for (torchrun's ranks).
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, status, usage = os.wait4(p.pid, 0); "
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(status))")


def write_model(path: str, shape: str) -> str:
    from tests.helpers import write_llama
    if not os.path.isfile(os.path.join(path, "config.json")):
        write_llama(path, **SHAPES[shape][0])
    return path


def write_data(path: str, n: int = 64) -> str:
    """text_only records long enough that every row is --seq-len tokens (the byte tokenizer)."""
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "apple"]
    with open(path, "w") as f:
        json.dump({"type": "text_only", "instances": [{"text": " ".join(words[(i * 7 + j) % 8] for j in range(600))}
                                                      for i in range(n)]}, f)
    return path


def run(model: str, data: str, out: str, shape: str, mode: str, launch: str, ckpt: bool) -> dict:
    """One train.py run; its largest rank's peak RSS (MB) and tokens/s in all."""
    _, batch, seq = SHAPES[shape]
    ranks = 1 if launch == "1 rank" else 2
    args = [os.path.join(ROOT, "train.py"), "--model", model, "--data", data, "--out", out, *MODES[mode],
            "--batch-size", str(batch // ranks), "--seq-len", str(seq), "--steps", "3", "--eval-every", "0",
            "--save-every", "0", "--no-plot", "--quiet", "--warmup", "0", "--threads", "1",
            *(["--grad-checkpointing"] if ckpt else [])]
    cmd = [sys.executable, *args] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
         "--parallel", launch.split()[0]]
    with tempfile.NamedTemporaryFile("r") as peak:
        p = subprocess.run([sys.executable, "-c", LAUNCHER, peak.name, *cmd], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode:
            sys.exit(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
        peak_mb = int(peak.read()) * 1024 / MB
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    speed = sum(r["tokens_per_s"] for r in rows[1:]) / len(rows[1:])  # after the first step (warm-up)
    return {"shape": shape, "mode": mode, "run": launch, "peak_rss_mb": round(peak_mb), "tokens_per_s": round(speed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="weight-heavy")
    ap.add_argument("--modes", default="lisa,full", help="the methods to run (default: %(default)s)")
    ap.add_argument("--runs", default="1 rank,fsdp x2,ddp x2", help="which launches (default: %(default)s)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="as train.py --grad-checkpointing")
    a = ap.parse_args()
    print("| shape | mode | run | peak RSS per rank (MB) | vs 1 rank | tokens/s in all |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as work:
        model = write_model(os.path.join(work, "model"), a.shape)
        data = write_data(os.path.join(work, "data.json"))
        for mode in a.modes.split(","):
            ref = None
            for launch in a.runs.split(","):
                r = run(model, data, os.path.join(work, f"out-{mode}-{launch.replace(' ', '')}"), a.shape, mode,
                        launch, a.grad_checkpointing)
                ref = ref or r["peak_rss_mb"]
                print(f"| {a.shape}{' +ckpt' if a.grad_checkpointing else ''} | {mode} | {launch} | "
                      f"{r['peak_rss_mb']} | {r['peak_rss_mb'] / ref:.2f}x | {r['tokens_per_s']} |", flush=True)


if __name__ == "__main__":
    main()
