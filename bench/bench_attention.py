#!/usr/bin/env python3
"""Peak memory of the PyTorch attention path with a mask: packed rows (--pack) and sliding windows, under
grouped-query attention (issue 17 item 4).

One forward + backward of nanolisa.attention.sdpa_attention on a masked call -- packed rows of 4 documents,
or a sliding window -- at B=1, 16 query heads, 4 key/value heads, head size 64, fp32, one subprocess per
(path, T), printing the peak RSS the call adds. The paths:

  math      SDPA's math backend: what CUDA's SDPA falls back to for a mask together with enable_gqa (the
            path nanolisa took before), forced here with sdpa_kernel(MATH). It materialises the
            (B, nh, T, S) fp32 scores and probabilities.
  gqa       the mask with enable_gqa: what nanolisa now does on CPU, where SDPA's fused CPU kernel takes both.
  expanded  k and v expanded to 16 heads, the mask without enable_gqa: what nanolisa now does on CUDA (where
            the memory-efficient backend takes the mask); on CPU the same fused CPU kernel runs it.
  flex      torch's flex_attention with a block mask, eagerly, forward only: in torch 2.13 flex_attention has
            no backward on CPU ("FlexAttention does not support backward on CPU"), and eagerly it
            materialises the scores; torch.compile(flex_attention) took ~2 minutes to compile one shape here.

Usage: .venv/bin/python bench/bench_attention.py [--seq 1024 2048 4096] [--paths math gqa expanded flex]
Memory figures are per process and do not depend on what else runs on the machine.
"""
import argparse
import resource
import subprocess
import sys

import torch

B, NH, NKV, HS = 1, 16, 4, 64


def one(path: str, T: int, kind: str) -> None:
    """Run one masked attention call and print the peak RSS it adds, in MB."""
    sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nanolisa.attention import AttentionMask, expand_kv, sdpa_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, HS, generator=g, requires_grad=path != "flex") for n in (NH, NKV, NKV))
    packed = kind == "packed"
    pos = torch.cat([torch.arange(T // 4)] * 4)[None] if packed else torch.arange(T)[None]
    mask = AttentionMask(pos, 0, packed, window=None if packed else 256)
    dense, _ = mask.dense()  # built before the baseline: the (B, 1, T, T) bool mask all paths share
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if path == "math":
        with sdpa_kernel([SDPBackend.MATH]):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    elif path == "gqa":
        y = sdpa_attention(q, k, v, mask)  # on CPU: enable_gqa with the mask
    elif path == "expanded":
        y = F.scaled_dot_product_attention(q, expand_kv(k, NH), expand_kv(v, NH), attn_mask=dense)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        allowed = dense[0, 0]
        block = create_block_mask(lambda b, h, i, j: allowed[i, j], None, None, T, T, device="cpu")
        y = flex_attention(q, k, v, block_mask=block, enable_gqa=True)
    if y.requires_grad:
        y.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - base) / 1024:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--paths", nargs="+", default=["math", "gqa", "expanded", "flex"])
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # path T kind: run in this process
    a = ap.parse_args()
    if a.one:
        return one(a.one[0], int(a.one[1]), a.one[2])
    print(f"peak RSS added by one forward + backward (flex: forward only), MB (B={B}, heads {NH}/{NKV}, "
          f"head size {HS}, fp32)")
    print("| mask | T | " + " | ".join(a.paths) + " |")
    print("|---|---|" + "---|" * len(a.paths))
    for kind in ("packed", "window 256"):
        for T in a.seq:
            row = []
            for path in a.paths:
                p = subprocess.run([sys.executable, __file__, "--one", path, str(T), kind.split()[0]],
                                   capture_output=True, text=True)
                row.append(p.stdout.strip() if p.returncode == 0 else "failed")
            print(f"| {kind} | {T} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
