"""Fused RMSNorm in Triton, forward and backward: one pass over each row instead of PyTorch's five kernels.

model.py's RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), normalised in fp32, in either of its forms:

    r = 1 / sqrt(mean(x^2) + eps)      g = w + offset          (offset 1: Gemma's 1 + w; 0 elsewhere)
    Llama:               y = g * (x r).to(x.dtype)            (the product in w's and x's common dtype)
    Gemma, OLMo 2:       y = (g * x r).to(x.dtype)            (WEIGHT_FP32: the product in fp32, then cast)

Backward, with x_hat = x r (fp32) and the roundings to x.dtype taken as the identity (as autograd does):

    dL/dw = sum over rows of dy * (x r).to(x.dtype)          (WEIGHT_FP32: dy * x_hat)
    dL/dx = r * (dy g - x_hat * mean(dy g x_hat))

The forward pass keeps r (one fp32 per row) for backward. dL/dw is summed per program over a slice of the
rows, in fp32, then over the programs by PyTorch. A row (the hidden size) is held in registers whole.

Supports: any hidden size up to 65536, fp16 / bf16 / fp32 inputs and weights, both forms. Tested:
tests/test_kernels.py, against model.py's RMSNorm (outputs, dL/dx, dL/dw) on CPU in Triton's interpreter
(TRITON_INTERPRET=1, triton 3.9), fp32, bf16 and fp16, Llama's, Gemma's and OLMo 2's forms (and q/k norms
over a head), hidden sizes that are and are not powers of two (the interpreter truncates
fp32 -> bf16 where a GPU rounds: there the outputs are written in fp32 and rounded by PyTorch). Not yet run on a GPU.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from nanolisa.kernels import interpreting
from nanolisa.model import RMSNorm

Tensor = torch.Tensor


@triton.jit
def _fwd_kernel(X, W, Y, RSTD, C, eps, offset, BLOCK_C: tl.constexpr, WEIGHT_FP32: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    x = tl.load(X + row * C + cols, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / C + eps)
    x_norm = x * rstd
    if not WEIGHT_FP32:
        x_norm = x_norm.to(X.dtype.element_ty).to(tl.float32)  # rounded to x's dtype, as model.py does
    g = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) + offset
    tl.store(Y + row * C + cols, (g * x_norm).to(Y.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_kernel(X, W, DY, RSTD, DX, DW_PARTIAL, N, C, rows_per_program, offset, BLOCK_C: tl.constexpr,
                WEIGHT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    ok = cols < C
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_C], tl.float32)
    first = pid * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, N)):
        offs = tl.cast(row, tl.int64) * C + cols
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        if WEIGHT_FP32:
            dw += dy * x_hat
        else:
            dw += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        dyw = dy * w
        dx = rstd * (dyw - x_hat * (tl.sum(dyw * x_hat, 0) / C))
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(DW_PARTIAL + pid * C + cols, dw, mask=ok)


class RMSNormFunction(torch.autograd.Function):
    """x (..., C), weight (C,) -> (..., C) in the dtype of x * weight (weight_fp32: in x's dtype)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, offset: float = 0.0, weight_fp32: bool = False
                ) -> Tensor:
        shape, C = x.shape, x.size(-1)
        x2 = x.reshape(-1, C).contiguous()  # (N, C)
        N = x2.size(0)
        out_dtype = x.dtype if weight_fp32 else torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(N, C, dtype=_store_dtype(out_dtype), device=x.device)
        rstd = torch.empty(N, dtype=torch.float32, device=x.device)
        BLOCK_C = triton.next_power_of_2(C)
        _fwd_kernel[(N,)](x2, weight, y, rstd, C, eps, offset, BLOCK_C=BLOCK_C, WEIGHT_FP32=weight_fp32,
                          num_warps=_warps(BLOCK_C))
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.offset, ctx.weight_fp32 = shape, offset, weight_fp32
        return y.to(out_dtype).view(shape)

    @staticmethod
    @once_differentiable  # backward is not itself differentiable: a second derivative is a clear error
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        N, C = x2.shape
        dy = dy.reshape(N, C).contiguous()
        dx = torch.empty_like(x2, dtype=_store_dtype(x2.dtype))
        programs = min(N, _programs(x2.device))
        rows_per_program = triton.cdiv(N, programs)
        programs = triton.cdiv(N, rows_per_program)
        dw_partial = torch.empty(programs, C, dtype=torch.float32, device=x2.device)
        BLOCK_C = triton.next_power_of_2(C)
        _bwd_kernel[(programs,)](x2, weight, dy, rstd, dx, dw_partial, N, C, rows_per_program, ctx.offset,
                                 BLOCK_C=BLOCK_C, WEIGHT_FP32=ctx.weight_fp32, num_warps=_warps(BLOCK_C))
        return dx.to(x2.dtype).view(ctx.shape), dw_partial.sum(0).to(weight.dtype), None, None, None


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels write: the output's dtype, except bf16 in Triton's interpreter, whose fp32 -> bf16
    conversion truncates where a GPU rounds to nearest: there they write fp32 and PyTorch rounds (so the tests
    check the arithmetic, not the interpreter's conversion)."""
    return torch.float32 if interpreting() and dtype == torch.bfloat16 else dtype


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _programs(device: torch.device) -> int:
    """Programs for the backward pass: a few per streaming multiprocessor (8 in the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


class TritonRMSNorm(RMSNorm):
    """model.py's RMSNorm computed by the Triton kernels (nanolisa.kernels.use_kernels swaps it in)."""

    def forward(self, x: Tensor) -> Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps, self.offset, self.weight_fp32)
