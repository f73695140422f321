#!/usr/bin/env python3
"""nanolisa.kernels against the PyTorch path: memory of a training step, and time per kernel.

  memory   peak RSS of training steps with the fused (chunked) linear + cross-entropy and without it (the plain
           model, full logits), at vocab 32000 and 128256, batch 1 x 512, full / LISA / LoRA:
           bench_train.py --kernels auto vs --kernels none, one process each. Printed per run: the process
           peak, and the step transient -- the most a step adds over the resident set it starts from
           (weights + optimizer state): activations, logits, gradients and temporaries.
  peers    LISA(1) at vocab 128256 beside the peers' stack (../shared/bench/peer_stack.py --mode lmflow:
           transformers + LMFlow's LISA callback), same shape, one process each.
  time     seconds per forward + backward of each kernel and of the PyTorch path it replaces. On a GPU: flash
           attention vs SDPA (causal and packed rows: SDPA then needs the dense mask), RMSNorm, and the
           linear + cross-entropy (Triton and chunked PyTorch vs full logits), with peak CUDA memory. On CPU
           only the PyTorch paths are timed (Triton runs only in its interpreter there, which says nothing
           about speed): the chunked linear + cross-entropy vs full logits, with peak RSS.

Usage:
  .venv/bin/python bench/bench_kernels.py memory peers time    # all three (~20 minutes on 2 busy CPU cores)
  .venv/bin/python bench/bench_kernels.py time --json          # one JSON line per measurement
Memory figures are per process and do not depend on what else runs; time figures do.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from bench_train import PeakRSS  # noqa: E402
from nanolisa.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from nanolisa.loss import IGNORE_INDEX  # noqa: E402

PEER = os.path.normpath(os.path.join(ROOT, "..", "shared", "bench", "peer_stack.py"))
MODEL = "--layers 4 --hidden 512 --ffn 1408 --heads 8 --kv-heads 4"  # a small Llama: 4 blocks of width 512
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}  # as train.py sets it (trainer.return_freed_memory_to_os)


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train(args: str) -> dict:
    r = run_json([sys.executable, os.path.join(HERE, "bench_train.py"), *args.split()])
    # the most a step adds over the resident set it starts from (step 0 starts before the optimizer state exists)
    r["step_transient_mb"] = max(p - r0 for p, r0 in zip(r["step_peak_mb"][1:], r["rss_by_step_mb"]))
    return r


MODES = {"full": "full", "lisa": "lisa --lisa-layers 1", "lora": "lora"}


def memory(report, modes: list[str]) -> None:
    for mode in (MODES[m] for m in modes):
        for vocab in (32000, 128256):
            rows = {}
            for kernels in ("none", "auto"):
                rows[kernels] = r = bench_train(f"--mode {mode} {MODEL} --vocab {vocab} --batch 1 --seq 512 "
                                                f"--steps 3 --kernels {kernels}")
                report(dict(what="train step", mode=r["mode"], vocab=vocab, kernels=r["kernels"],
                            peak_rss_mb=r["peak_rss_mb"], step_transient_mb=r["step_transient_mb"]))
            f, u = rows["auto"], rows["none"]
            report(dict(what="fused / unfused", mode=f["mode"], vocab=vocab,
                        peak_ratio=round(f["peak_rss_mb"] / u["peak_rss_mb"], 3),
                        transient_ratio=round(f["step_transient_mb"] / u["step_transient_mb"], 3)))


def peers(report) -> None:
    shape = f"{MODEL} --vocab 128256 --batch 1 --seq 1024 --steps 4 --interval 1"
    peer = run_json([sys.executable, PEER, "--mode", "lmflow", *shape.split()])
    report(dict(what="peers' stack", mode="lmflow", peak_rss_mb=peer["peak_rss_mb"]))
    for kernels in ("none", "auto"):
        r = bench_train(f"--mode lisa --lisa-layers 1 {shape} --kernels {kernels}")
        report(dict(what="nanolisa", mode=r["mode"], kernels=r["kernels"], peak_rss_mb=r["peak_rss_mb"],
                    ratio_to_peers=round(r["peak_rss_mb"] / peer["peak_rss_mb"], 3)))


# ----------------------------------------------------------------------------------------------------------
# Time


def timed(fn, device: torch.device, repeat: int = 3) -> tuple[float, float]:
    """(best seconds of `repeat` calls after one warm-up, peak memory MB above the start of a call)."""
    fn()
    best, peak = float("inf"), 0.0
    rss = PeakRSS() if device.type == "cpu" else None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            rss.end_step()
            base = PeakRSS.read()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            peak = max(peak, rss.end_step() - base)
        best = min(best, time.perf_counter() - t0)
    return best, peak


def time_cross_entropy(report, device, dtype) -> None:
    from nanolisa.kernels import triton_installed
    impls = {"full logits": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, reduction="none",
                                                            ignore_index=IGNORE_INDEX),
             "chunked torch": lambda h, w, t: linear_cross_entropy(h, w, None, t)}
    if device.type == "cuda" and triton_installed():
        from nanolisa.kernels.triton_linear_cross_entropy import triton_linear_cross_entropy
        impls["chunked triton"] = lambda h, w, t: triton_linear_cross_entropy(h, w, None, t)
    shapes = [(1024, 512, 32000), (1024, 512, 128256)] + ([(4096, 2048, 128256)] if device.type == "cuda" else [])
    for N, C, V in shapes:
        h = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(V, C, device=device, dtype=dtype) / C**0.5).requires_grad_()
        t = torch.randint(0, V, (N,), device=device)
        for name, fn in impls.items():
            def step():
                fn(h, w, t).sum().backward()
                h.grad = w.grad = None
            s, mb = timed(step, device)
            report(dict(what="linear+CE fwd+bwd", impl=name, tokens=N, hidden=C, vocab=V, dtype=str(dtype),
                        ms=round(1e3 * s, 1), peak_mb=round(mb)))


ATTENTION_SHAPES = [(4, 1024, 16, 4, 64), (2, 2048, 32, 8, 128), (1, 4096, 32, 8, 128)]  # (B, T, nh, nkv, hs)
NORM_SHAPE = (8192, 4096)  # (rows, hidden)


def time_gpu_kernels(report, device, dtype) -> None:
    from nanolisa.kernels.flash_attention import flash_attention
    from nanolisa.kernels.rmsnorm import TritonRMSNorm
    from nanolisa.model import AttentionMask, RMSNorm, sdpa_attention
    for B, T, nh, nkv, hs in ATTENTION_SHAPES:
        q = torch.randn(B, T, nh, hs, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        k = torch.randn(B, T, nkv, hs, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        v = torch.randn(B, T, nkv, hs, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        docs = torch.cat([torch.arange(n) for n in (T // 2, T // 4, T // 8, T - T // 2 - T // 4 - T // 8)])
        for packed in (False, True):
            pos = docs.expand(B, T).to(device) if packed else torch.arange(T, device=device).expand(B, T)
            for name, attn in (("sdpa", sdpa_attention), ("flash", flash_attention)):
                def step():
                    attn(q, k, v, AttentionMask(pos, 0, packed)).sum().backward()
                    q.grad = k.grad = v.grad = None
                s, mb = timed(step, device)
                report(dict(what="attention fwd+bwd", impl=name, packed=packed, B=B, T=T, nh=nh, nkv=nkv, hs=hs,
                            dtype=str(dtype), ms=round(1e3 * s, 2), peak_mb=round(mb)))
    N, C = NORM_SHAPE
    x = torch.randn(N, C, device=device, dtype=dtype, requires_grad=True)
    for name, cls in (("torch", RMSNorm), ("triton", TritonRMSNorm)):
        norm = cls(C, 1e-6).to(device)

        def step():
            norm(x).sum().backward()
            x.grad = norm.weight.grad = None
        s, mb = timed(step, device)
        report(dict(what="RMSNorm fwd+bwd", impl=name, rows=N, hidden=C, dtype=str(dtype), ms=round(1e3 * s, 3),
                    peak_mb=round(mb)))


def timing(report) -> None:
    if torch.cuda.is_available():
        device = torch.device("cuda")
        time_gpu_kernels(report, device, torch.bfloat16)
        time_cross_entropy(report, device, torch.bfloat16)
    else:
        report(dict(what="note", text="no CUDA GPU: Triton kernels not timed (the interpreter says nothing "
                                      "about speed)"))
        time_cross_entropy(report, torch.device("cpu"), torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", choices=["memory", "peers", "time"], help="what to measure")
    ap.add_argument("--json", action="store_true", help="one JSON line per measurement instead of text")
    ap.add_argument("--modes", default="full,lisa,lora", help="memory: training modes to measure, of "
                    "full, lisa (gamma 1), lora (r=8, all linear layers) (default: %(default)s)")
    a = ap.parse_args()

    def report(row: dict) -> None:
        print(json.dumps(row) if a.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    for part in a.parts:
        if part == "memory":
            memory(report, a.modes.split(","))
        else:
            {"peers": peers, "time": timing}[part](report)


if __name__ == "__main__":
    main()
