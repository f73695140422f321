"""Fused linear + cross-entropy with Triton kernels for the softmax work of each chunk.

The chunk loop, the matmuls and the autograd Function are linear_cross_entropy.py's (read it first); this
file replaces its PyTorch softmax work (`TORCH_ROWS`) by two kernels, one program per token row, run on each
chunk's logits (the second only when gradients are wanted):

  _loss_kernel  one pass over the row's logits z (V,): online max and sum of exp (as flash attention's
                online softmax), lse = max + log(sum), loss = lse - z[target] (0 for IGNORE_INDEX).
  _grad_kernel  one pass: dL/dz = g * (exp(z - lse) - onehot(target)), written over z in place.

In PyTorch the same work is logsumexp, gather, sub, exp, index-put and mul, each a pass over the (chunk, V)
logits, and on bf16 logits an fp32 copy; here the logits are read once per pass and never copied, and
their gradient takes no memory of its own. (Liger-Kernel's fused linear cross-entropy works the same way.)

Supports: fp16 / bf16 / fp32 logits (statistics in fp32), any vocabulary size. Tested: tests/test_kernels.py,
against F.cross_entropy on full logits (loss, dL/dhidden, dL/dweight, dL/dbias, tied embedding), on CPU in
Triton's interpreter (TRITON_INTERPRET=1, triton 3.9), fp32 and under bf16 autocast. Not yet run on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanolisa.kernels import interpreting
from nanolisa.kernels.linear_cross_entropy import linear_cross_entropy
from nanolisa.loss import IGNORE_INDEX

Tensor = torch.Tensor


@triton.jit
def _loss_kernel(Z, z_row_stride, TARGETS, LOSS, LSE, V, IGNORE: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * z_row_stride
    m = float("-inf")  # running max
    s = 0.0  # running sum of exp(z - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(TARGETS + row)
    valid = target != IGNORE
    z_target = tl.load(z_row + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - z_target, 0.0))
    tl.store(LSE + row, lse)


@triton.jit
def _grad_kernel(Z, z_row_stride, DZ, dz_row_stride, TARGETS, LSE, G, V, IGNORE: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row, dz_row = Z + row * z_row_stride, DZ + row * dz_row_stride
    target = tl.load(TARGETS + row)
    g = tl.where(target != IGNORE, tl.load(G + row), 0.0)  # an ignored row has no gradient
    lse = tl.load(LSE + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = cols < V
        z = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
        dz = (tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)) * g
        tl.store(dz_row + cols, dz.to(DZ.dtype.element_ty), mask=ok)


def _block(V: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(V), 8192)
    return block, min(max(block // 512, 1), 16)  # (BLOCK_V, num_warps)


class TritonRows:
    """linear_cross_entropy.Rows with Triton kernels."""

    def loss(self, z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        n, V = z.shape
        assert z.stride(1) == 1
        loss = torch.empty(n, dtype=torch.float32, device=z.device)
        lse = torch.empty(n, dtype=torch.float32, device=z.device)
        BLOCK_V, warps = _block(V)
        _loss_kernel[(n,)](z, z.stride(0), targets.contiguous(), loss, lse, V, IGNORE=IGNORE_INDEX,
                           BLOCK_V=BLOCK_V, num_warps=warps)
        return loss, lse

    def loss_and_grad(self, z: Tensor, targets: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss, lse = self.loss(z, targets)  # leaves z as it is
        return loss, lse, self.grad(z, targets, lse, g)

    def grad(self, z: Tensor, targets: Tensor, lse: Tensor, g: Tensor) -> Tensor:
        n, V = z.shape
        assert z.stride(1) == 1
        # In place: dL/dz overwrites z. Except in Triton's interpreter with bf16 logits: its fp32 -> bf16
        # conversion truncates where a GPU rounds to nearest, so there the kernel writes fp32 and PyTorch
        # rounds (the tests then check the arithmetic, not the interpreter's conversion).
        dz = torch.empty(z.shape, dtype=torch.float32, device=z.device) \
            if interpreting() and z.dtype == torch.bfloat16 else z
        BLOCK_V, warps = _block(V)
        _grad_kernel[(n,)](z, z.stride(0), dz, dz.stride(0), targets.contiguous(), lse.contiguous(),
                           g.float().contiguous(), V, IGNORE=IGNORE_INDEX, BLOCK_V=BLOCK_V, num_warps=warps)
        return z.copy_(dz) if dz is not z else z  # now dL/dz


TRITON_ROWS = TritonRows()


def triton_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                chunk: int | None = None, softcap: float | None = None) -> Tensor:
    """linear_cross_entropy with the Triton softmax kernels: hidden (N, C) -> per-token loss (N,) fp32."""
    return linear_cross_entropy(hidden, weight, bias, targets, chunk, TRITON_ROWS, softcap)

