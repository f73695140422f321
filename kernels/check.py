"""A self-check of the Triton kernels on this machine: each one against its PyTorch reference, in seconds.

    python -m nanolisa.kernels.check                   # every kernel, fp16/bf16/fp32, head sizes 64 and 128
    python -m nanolisa.kernels.check --dtype bf16 --head-size 128
    TRITON_INTERPRET=1 python -m nanolisa.kernels.check  # without a GPU: Triton's interpreter (slow)

It prints one line per kernel, dtype and head size (pass or FAIL, and the largest error against the
reference) and exits 1 if any failed. The references are model.py's: `sdpa_attention` for flash attention
(outputs and the gradients of q, k, v), `RMSNorm` for the fused RMSNorm (output, dL/dx, dL/dw), and
F.cross_entropy over the full logits for the Triton linear + cross-entropy (loss, dL/dh, dL/dW).

`use_kernels` (kernels/__init__.py) runs the same checks, once per process, for the head size and dtype a
model uses before it swaps a Triton kernel in: a kernel that fails to compile, to launch, or to match its
reference on this GPU is left out, with a one-line notice, and PyTorch's does the work instead. No user's
run ends because a kernel does not work on their GPU.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch
import torch.nn.functional as F

from nanolisa.kernels import interpreting, triton_installed

DTYPE_NAMES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The largest error allowed, relative to the reference's largest magnitude. The inputs are rounded to the
# dtype first, so the reference sees the same numbers; what remains is the kernels' own rounding (fp32
# accumulation in both) plus the rounding of the result, a few units of the dtype's last place.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))


def _grads(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    """fn(*inputs) and the gradients of every input for the upstream gradient dy."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def check_attention(device: torch.device, dtype: torch.dtype, head_size: int) -> float:
    """Flash attention against SDPA, causal, grouped-query, with packed rows: the largest relative error
    of the output and of dq, dk, dv."""
    from nanolisa.kernels.flash_attention import flash_attention
    from nanolisa.model import AttentionMask, sdpa_attention
    g = torch.Generator(device="cpu").manual_seed(0)
    B, nh, nkv, T = 1, 4, 2, 72
    q, k, v = (torch.randn(B, n, T, head_size, generator=g).to(device, dtype) for n in (nh, nkv, nkv))
    dy = torch.randn(B, nh, T, head_size, generator=g).to(device, dtype)
    errors = []
    for packed in (False, True):
        pos = torch.arange(T).expand(B, T)
        if packed:  # two documents per row, the second starting at 40
            pos = torch.cat([torch.arange(40), torch.arange(T - 40)]).expand(B, T)
        pos = pos.to(device)
        got = _grads(lambda a, b, c: flash_attention(a, b, c, AttentionMask(pos, 0, packed)), [q, k, v], dy)
        want = _grads(lambda a, b, c: sdpa_attention(a.float(), b.float(), c.float(), AttentionMask(pos, 0, packed)),
                      [q, k, v], dy.float())
        errors += [_rel_err(a, b) for a, b in zip(got, want)]
    return max(errors)


def check_rmsnorm(device: torch.device, dtype: torch.dtype, hidden: int = 500) -> float:
    """The fused RMSNorm against model.py's: output, dL/dx, dL/dw."""
    from nanolisa.kernels.rmsnorm import RMSNormFunction
    from nanolisa.model import RMSNorm
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(24, hidden, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    dy = torch.randn(24, hidden, generator=g).to(device, dtype)
    ref = RMSNorm(hidden, 1e-6)

    def reference(x, w):  # model.py's RMSNorm in fp32, with w as an input so that it gets a gradient
        return torch.func.functional_call(ref, {"weight": w.float()}, (x.float(),))
    got = _grads(lambda x, w: RMSNormFunction.apply(x, w, 1e-6), [x, w], dy)
    want = _grads(reference, [x, w], dy.float())
    return max(_rel_err(a, b) for a, b in zip(got, want))


def check_loss(device: torch.device, dtype: torch.dtype, vocab: int = 1000, hidden: int = 64) -> float:
    """The Triton linear + cross-entropy against F.cross_entropy over the full logits: the per-token loss,
    dL/dh and dL/dW, with ignored tokens and a chunk that does not divide the tokens."""
    from nanolisa.kernels.triton_linear_cross_entropy import triton_linear_cross_entropy
    from nanolisa.loss import IGNORE_INDEX
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(150, hidden, generator=g).to(device, dtype)
    w = (0.05 * torch.randn(vocab, hidden, generator=g)).to(device, dtype)
    t = torch.randint(0, vocab, (150,), generator=g)
    t[::7] = IGNORE_INDEX
    t = t.to(device)
    dy = torch.ones(150, device=device)  # a summed loss, as training's
    got = _grads(lambda h, w: triton_linear_cross_entropy(h, w, None, t, chunk=64), [h, w], dy)
    want = _grads(lambda h, w: F.cross_entropy(F.linear(h.float(), w.float()), t, reduction="none",
                                               ignore_index=IGNORE_INDEX), [h, w], dy)
    return max(_rel_err(a, b) for a, b in zip(got, want))


def check(kernel: str, device: torch.device, dtype: torch.dtype, head_size: int = 128) -> tuple[bool, str]:
    """(whether `kernel` -- "attention", "rmsnorm" or "loss" -- works on `device` in `dtype`, a few words:
    the largest error against the reference, or the compile or launch error)."""
    try:
        if kernel == "attention":
            err = check_attention(device, dtype, head_size)
        elif kernel == "rmsnorm":
            err = check_rmsnorm(device, dtype)
        else:
            err = check_loss(device, dtype)
    except Exception as e:  # a compile or launch failure on this GPU: exactly what this check is for
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return False, f"{type(e).__name__}: {first}"
    return err <= TOLERANCE[dtype], f"max error {err:.1e} (allowed {TOLERANCE[dtype]:.0e})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanolisa.kernels.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), action="append",
                   help="a dtype to check (repeatable; default: all three)")
    p.add_argument("--head-size", type=int, action="append", help="an attention head size (default: 64 and 128)")
    args = p.parse_args(argv)
    if not triton_installed():
        print("error: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not interpreting():
        print("error: no CUDA GPU here; set TRITON_INTERPRET=1 to check the kernels in Triton's interpreter",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    print(f"Triton kernels on {name}")
    failed = 0
    for dname in args.dtype or list(DTYPE_NAMES):
        dtype = DTYPE_NAMES[dname]
        rows = [("attention", hs) for hs in args.head_size or (64, 128)] + [("rmsnorm", None), ("loss", None)]
        for kernel, hs in rows:
            ok, detail = check(kernel, device, dtype, hs or 128)
            failed += not ok
            what = f"{kernel} head_size={hs}" if hs else kernel
            print(f"  {'pass' if ok else 'FAIL'}  {dname:4s}  {what:24s}  {detail}", flush=True)
    print("all kernels pass" if not failed else f"{failed} check(s) failed: nanolisa uses PyTorch's kernels there")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
