#!/usr/bin/env python3
"""Issue 18's experiment: LISA's frozen blocks kept in bf16 instead of fp32 master weights.

A block that LISA freezes needs its weights only for the forward and the input gradient, which bf16 autocast
computes in bf16 anyway; its fp32 copy matters only for the updates it gets when it is active again. Keeping
the frozen blocks in bf16 saves 2 bytes per frozen weight (at Llama-2-7B with gamma = 2: 2 x 30/32 x 6.5e9 =
12.1 GB), and rounds each block's fp32 weights to bf16 whenever it is frozen. This measures what that does
to the result: the demo recipe (`train.py --dtype bf16 --seed S`), as it is and with every block that LISA
freezes cast to bf16 at the switch (and back to fp32 when it is drawn again), then the held-out loss and
exact match. The cast is patched into LISA here, not offered as a flag: bench/RESULTS.md has the figures.

Usage:
  .venv/bin/python bench/frozen_dtype.py --seeds 0 1 2      # ~18 minutes on 2 idle cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def patch_lisa() -> None:
    """After each switch: frozen blocks' parameters to bf16, active ones back to fp32 (in place: the same
    Parameter objects, so the optimizer and FSDP-free trainer keep them)."""
    import torch
    from nanolisa.lisa import LISA
    switch = LISA.maybe_switch

    def maybe_switch(self, step, optimizer=None):
        switched = switch(self, step, optimizer)
        if switched:
            for i, block in enumerate(self.model.blocks):
                dtype = torch.float32 if i in self.active else torch.bfloat16
                for p in block.parameters():
                    p.data = p.data.to(dtype)
        return switched

    LISA.maybe_switch = maybe_switch


def child(argv: list[str]) -> None:
    if argv[0] == "bf16-frozen":
        patch_lisa()
    from nanolisa.cli.train import main
    main(argv[1:])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "frozen-dtype"), help="a directory for the runs")
    ap.add_argument("--steps", help="train.py --steps (default: the demo recipe's 3000)")
    a = ap.parse_args()
    py = sys.executable
    rows = []
    for seed in a.seeds:
        for variant in ("fp32-masters", "bf16-frozen"):
            out = os.path.join(a.out, f"{variant}-s{seed}")
            t0 = time.time()
            subprocess.run([py, __file__, "--child", variant, "--dtype", "bf16", "--seed", str(seed), "--out", out,
                            "--overwrite", "--no-plot", "--quiet"] + (["--steps", a.steps] if a.steps else []),
                           check=True, cwd=ROOT)
            wall = time.time() - t0
            acc = subprocess.run([py, "eval.py", "--model", out, "--metric", "accuracy"], capture_output=True,
                                 text=True, check=True, cwd=ROOT).stdout.split()
            with open(os.path.join(out, "metrics.jsonl")) as f:
                loss = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r][-1]
            rows.append(dict(seed=seed, variant=variant, eval_loss=loss, accuracy=acc[1], wall_s=round(wall, 1)))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| seed | variant | held-out loss | exact match | wall s |\n|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['variant']} | {r['eval_loss']:.4f} | {r['accuracy']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
