"""Fused linear + cross-entropy: the LM head and the loss computed chunk by chunk, so the logits never exist
in full.

At a large vocabulary the logits are the largest tensors of a training step. For N tokens and a V-word
vocabulary the unfused loss keeps the fp32 logits (N, V), the log-softmax that cross_entropy saves for
backward (N, V), and in backward their gradients (N, V): at N = 1024, V = 128256 each is 525 MB, several
times the weights of a small model. Here the head and the loss run over `chunk` tokens at a time:

    z    = h W^T + b                     (chunk, V)  the logits of one chunk: the only (., V) tensor alive
    lse  = log sum_v exp(z_v)            (chunk,)
    loss = lse - z[target]               (chunk,)

and, while the chunk's logits are at hand, the softmax gradient and what it gives the head's inputs
(g = dL/dloss of each token, not yet known in forward):

    dL/dz = g * (softmax(z) - onehot(target)) = g * (exp(z - lse) - onehot(target))
    dL/dh = dL/dz W      dL/dW = sum over chunks of (dL/dz)^T h      dL/db = sum over tokens of dL/dz

Forward sums these for g = 1; backward scales them by g. That is exact when g is the same for every token,
which it is whenever the loss is a sum or mean of the per-token losses -- every training step of nanolisa
(trainer.py divides the summed NLL by the step's token count). For any other g, backward recomputes each
chunk's logits from the saved lse instead. Computing the gradients in forward costs no extra memory: the
(V, C) weight gradient is allocated at the end of forward instead of at the start of backward, which is the
next thing that happens, and no head matmul is repeated. Tokens without a target (prompt, padding) are
dropped before the head: they cost neither memory nor time.

Gemma 2 soft-caps its logits, z' = c tanh(z / c) (final_logit_softcapping): with `softcap` the loop caps
each chunk's logits in fp32 before the softmax work and scales their gradient by dz'/dz = 1 - (z'/c)^2,
so the logits still never exist in full (the Triton rows then run on the capped chunk; the cap itself is
one PyTorch pass over the chunk).

Precision follows the unfused path `nanolisa.loss.head_nll(h, lm_head, ...)`: the matmuls run in the
autocast dtype when autocast is on (else in the weights' dtype), the softmax statistics in fp32, and the
weight gradient is summed over chunks in fp32.

Two implementations share this loop and differ in the per-chunk softmax work (`Rows`): PyTorch ops here
(`TORCH_ROWS`, CPU and GPU), or one Triton kernel per pass in triton_linear_cross_entropy.py, which also
writes dL/dz over the logits in place. The matmuls are PyTorch's in both (cuBLAS on a GPU).

Tested (tests/test_kernels.py, CPU): loss and gradients of hidden states, head weight, bias and a tied
embedding against F.cross_entropy on full logits, for a per-token g (the recomputing backward) and a
uniform one, with IGNORE_INDEX rows and a chunk size that does not divide the token count; a whole
training step against the unfused step.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch.autograd.function import once_differentiable
import torch.nn as nn
import torch.nn.functional as F

from nanolisa.loss import IGNORE_INDEX, head_nll

Tensor = torch.Tensor

CHUNK_BYTES = 64 * 2**20  # default chunk: about this many bytes of fp32 logits ...
MIN_CHUNK = 64  # ... but at least this many tokens, so each head matmul still does real work per weight read
# On a GPU the chunk is sized by arithmetic intensity instead. Per chunk of c tokens the three head matmuls
# read the (V, C) head twice in bf16 (z = h W^T, dh = dz W: 2VC bytes each for 2cVC FLOPs) and read and
# write its fp32 gradient once (dW += dz^T h: 8VC bytes for 2cVC FLOPs): c/4 FLOPs per byte at worst. An
# H100/H200 needs ~200-300 FLOPs per byte of HBM traffic to be compute-bound (~1 PFLOP/s bf16 over 3.3-4.8
# TB/s), so c >= 1024. The logits' own traffic is ~cV x (4 + 2) bytes read and written a few times for 6cVC
# FLOPs, C/4 per byte whatever c is. At V = 128k a 1024-token chunk is 525 MB of fp32 logits (plus their
# bf16 copy): taken only where it is a small part of the free memory (GPU_CHUNK_FREE_SHARE), else the cap.
GPU_CHUNK_TOKENS = 1024
GPU_CHUNK_FREE_SHARE = 8  # the chunk's buffers (fp32 logits, their gradient, a low-precision copy) <= 1/8 free


def default_chunk(vocab_size: int, device: str = "cpu", free_bytes: int | None = None) -> int:
    """Tokens per chunk. CPU, or a GPU short of memory: ~64 MB of fp32 logits (130 tokens at a 128k vocabulary,
    524 at 32k, more for small vocabularies). A GPU: GPU_CHUNK_TOKENS, when 10 bytes per logit of them take
    at most 1/GPU_CHUNK_FREE_SHARE of `free_bytes` (None: assume they fit)."""
    capped = max(MIN_CHUNK, CHUNK_BYTES // (4 * vocab_size))
    if device != "cuda":
        return capped
    fits = free_bytes is None or GPU_CHUNK_TOKENS * vocab_size * 10 * GPU_CHUNK_FREE_SHARE <= free_bytes
    return max(capped, GPU_CHUNK_TOKENS) if fits else capped


def chunk_for(weight: Tensor) -> int:
    """default_chunk for a head on its device (the GPU's free memory read once per call: no host sync)."""
    if weight.device.type != "cuda":
        return default_chunk(weight.size(0))
    return default_chunk(weight.size(0), "cuda", torch.cuda.mem_get_info(weight.device)[0])


_fp32_out_gemm: dict[torch.device, bool] = {}  # device -> whether addmm with out_dtype=float32 works there


def add_outer_(dw: Tensor, dz: Tensor, h: Tensor) -> None:
    """dw (V, C) fp32 += dz^T (V, c) @ h (c, C), summed in fp32.

    fp32 inputs: addmm_ in place. bf16/fp16 inputs on CUDA: one GEMM that accumulates into the fp32 dw
    (torch.addmm with out_dtype=float32, as Liger-Kernel does), checked once per device against the
    fallback; elsewhere the fallback, a low-precision product (V, C) then an fp32 add (a (V, C) temporary and
    a second pass over dW)."""
    if dz.dtype == torch.float32:
        dw.addmm_(dz.t(), h)
        return
    if dz.is_cuda and _fp32_out_gemm.setdefault(dw.device, _fp32_out_gemm_works(dw.device, dz.dtype)):
        torch.addmm(dw, dz.t(), h, out_dtype=torch.float32, out=dw)
        return
    dw += dz.t() @ h


def _fp32_out_gemm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch and GPU run addmm(out_dtype=float32) into its own fp32 input, and get the same sum as
    the fallback to low-precision rounding."""
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(64, 48, device=device, generator=g).to(dtype) for _ in range(2))  # (c, V), (c, C)
    base = torch.randn(48, 48, device=device, generator=g)
    try:
        got = base.clone()
        torch.addmm(got, a.t(), b, out_dtype=torch.float32, out=got)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    want = base + a.t().float() @ b.float()
    return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3))


class Rows(Protocol):
    """The softmax work on one chunk's logits z (c, V), targets (c,) (IGNORE_INDEX: no loss), g (c,) the
    weight of each token's loss. Each method may overwrite z: one chunk-sized buffer is all it needs."""

    def loss(self, z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """-> (loss (c,) fp32, 0 where ignored; lse (c,) fp32)."""

    def loss_and_grad(self, z: Tensor, targets: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> (loss, lse, dL/dz = g * (softmax(z) - onehot(targets)) (c, V), 0 in ignored rows)."""

    def grad(self, z: Tensor, targets: Tensor, lse: Tensor, g: Tensor) -> Tensor:
        """-> dL/dz from the lse that `loss` returned for these logits."""


class TorchRows:
    """Rows in PyTorch ops, in place on the logits (fp32 logits; bf16/fp16 ones get one fp32 copy)."""

    def loss(self, z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        loss, lse, _ = self._softmax_(z, targets)
        return loss, lse

    def loss_and_grad(self, z: Tensor, targets: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss, lse, p = self._softmax_(z, targets)  # p = exp(z - max), (c, V)
        p.div_(p.sum(-1, keepdim=True))  # softmax(z)
        return loss, lse, self._minus_onehot_times_g_(p, targets, g)

    def grad(self, z: Tensor, targets: Tensor, lse: Tensor, g: Tensor) -> Tensor:
        p = z.float().sub_(lse[:, None]).exp_()  # softmax(z)
        return self._minus_onehot_times_g_(p, targets, g)

    @staticmethod
    def _softmax_(z: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, lse, exp(z - rowmax(z)) in z's fp32 buffer)."""
        z = z.float()  # z itself when it is fp32
        z_target = z.gather(1, targets.clamp(min=0)[:, None])[:, 0]  # (c,)
        m = z.amax(dim=-1, keepdim=True)  # (c, 1)
        lse = z.sub_(m).exp_().sum(-1).log_().add_(m[:, 0])  # (c,)
        return torch.where(targets != IGNORE_INDEX, lse - z_target, 0.0), lse, z

    @staticmethod
    def _minus_onehot_times_g_(p: Tensor, targets: Tensor, g: Tensor) -> Tensor:
        valid = targets != IGNORE_INDEX
        rows = torch.arange(len(targets), device=p.device)[valid]
        p[rows, targets[valid]] -= 1.0
        return p.mul_(torch.where(valid, g, 0.0)[:, None])


TORCH_ROWS = TorchRows()


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in on the unfused path: autocast's if on, else the weight's."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """hidden (n, C), weight (V, C), bias (V,) or None, targets (n,) without IGNORE_INDEX -> loss (n,) fp32."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
                rows: Rows, dtype: torch.dtype, need_grad: bool, softcap: float | None = None) -> Tensor:
        n = hidden.size(0)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        need = ctx.needs_input_grad[:3] if need_grad else (False, False, False)
        grads = _new_grads(hidden, weight, bias, need)
        ones = torch.ones(n, dtype=torch.float32, device=hidden.device)
        _chunks(hidden, weight, bias, targets, dtype, chunk, rows, loss, lse, ones, grads, softcap)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.rows, ctx.dtype, ctx.softcap = chunk, rows, dtype, softcap
        ctx.grads = grads if any(need) else None  # the gradients for g = 1, until backward scales them
        return loss

    @staticmethod
    @once_differentiable  # backward is not itself differentiable: a second derivative is a clear error
    def backward(ctx, g: Tensor):  # g (n,): dL/dloss of each token
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        g = g.float()
        grads, ctx.grads = ctx.grads, None  # used once: a second backward (retain_graph) recomputes
        uniform = grads is not None and (len(g) == 0 or bool((g == g[0]).all()))
        if uniform:  # scale the forward's gradients, in place
            for t in grads:
                if t is not None and len(g):
                    t.mul_(g[0])
        else:  # recompute each chunk's logits and weight its softmax gradient by g
            grads = _new_grads(hidden, weight, bias, ctx.needs_input_grad[:3])
            _chunks(hidden, weight, bias, targets, ctx.dtype, ctx.chunk, ctx.rows, None, lse, g, grads, ctx.softcap)
        dh, dw, db = grads
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None, None, None)


def _new_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, need) -> list[Tensor | None]:
    """Zeroed [dL/dh, dL/dW (fp32), dL/db (fp32)], None where no gradient is needed."""
    f32 = dict(dtype=torch.float32, device=weight.device)
    return [torch.zeros_like(hidden) if need[0] else None,
            torch.zeros(weight.shape, **f32) if need[1] else None,
            torch.zeros(bias.shape, **f32) if bias is not None and need[2] else None]


def _chunks(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, dtype: torch.dtype,
            chunk: int, rows: Rows, loss: Tensor | None, lse: Tensor, g: Tensor, grads: list,
            softcap: float | None = None) -> None:
    """The loop over chunks of tokens. With `loss` given (forward), fill loss and lse; otherwise (a
    recomputing backward) read lse. Then add g-weighted dL/dh, dL/dW, dL/db to grads (those not None).
    softcap: the logits are z' = softcap * tanh(z / softcap) (Gemma 2), in fp32; dz'/dz = 1 - (z' / softcap)^2
    scales their gradient (one more chunk-sized fp32 buffer)."""
    dh, dw, db = grads
    need = dh is not None or dw is not None or db is not None
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)  # cast once, not per chunk (a no-op without autocast)
        b = None if bias is None else bias.to(dtype)
        for s in range(0, hidden.size(0), chunk):
            h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk]
            z = F.linear(h, w, b)  # (c, V): the chunk's logits
            slope = None
            if softcap is not None:
                tanh = z.float().div_(softcap).tanh_()  # (c, V) fp32, in place when z is fp32
                slope = tanh.square().neg_().add_(1.0) if need else None  # dz'/dz
                z = tanh.mul_(softcap)
            if not need:  # forward without gradients
                loss[s:s + chunk], lse[s:s + chunk] = rows.loss(z, t)
                continue
            if loss is not None:  # forward
                loss[s:s + chunk], lse[s:s + chunk], dz = rows.loss_and_grad(z, t, g[s:s + chunk])
            else:  # a recomputing backward
                dz = rows.grad(z, t, lse[s:s + chunk], g[s:s + chunk])
            del z  # dz may be z, overwritten: (c, V)
            if slope is not None:
                dz = dz.mul_(slope)
                del slope
            if db is not None:
                db += dz.sum(0, dtype=torch.float32)
            dz = dz.to(dtype)
            if dh is not None:
                dh[s:s + chunk] = dz @ w  # (c, C)
            if dw is not None:  # (V, C), summed in fp32
                add_outer_(dw, dz, h)
            del dz


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         chunk: int | None = None, rows: Rows = TORCH_ROWS, softcap: float | None = None) -> Tensor:
    """Per-token next-token NLL of the head (weight (V, C), bias (V,) or None) on hidden (N, C) against
    targets (N,): (N,) fp32, 0 where targets == IGNORE_INDEX. Equals
    `F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="none")`, with the logits
    soft-capped first (softcap * tanh(logits / softcap)) when softcap is given."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"want hidden (N, C) and targets (N,), got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    chunk = chunk or chunk_for(weight)
    # Only the tokens that take a loss go through the head: prompt and padding tokens cost nothing.
    # (Called even when there are none, so that the result stays part of the autograd graph.)
    keep = (targets != IGNORE_INDEX).nonzero()[:, 0]  # (n,)
    nll = LinearCrossEntropy.apply(hidden[keep], weight, bias, targets[keep], chunk, rows,
                                   _compute_dtype(hidden, weight), torch.is_grad_enabled(), softcap)  # (n,)
    return hidden.new_zeros(targets.shape, dtype=torch.float32).index_put((keep,), nll)


class HeadLoss:
    """The LM head and the loss together, as `nanolisa.kernels.use_kernels` sets it as a model's `head_loss`
    (model.py calls it inside forward when given targets): hidden (B, T, C), head, targets (B, T) -> (B, T).

    Only a plain nn.Linear head (or FSDP2's subclass of it) is fused. A head that is something else -- a
    LoRALinear (LoRA with lm_head among its targets) computes W + s*B@A(dropout(x)) -- takes the unfused
    path (nanolisa.loss.head_nll), with a notice: computing its effective weight would cost a copy of the
    (V, C) weight every step. `modules_to_save=["lm_head"]` and tied embeddings keep a plain Linear head and
    are fused."""

    def __init__(self, rows: Rows = TORCH_ROWS, chunk: int | None = None):
        self.rows, self.chunk = rows, chunk

    def supports(self, head: nn.Module) -> bool:
        if isinstance(head, nn.Linear):
            return True
        from nanolisa.kernels import notice_once
        notice_once(f"the LM head is a {type(head).__name__}, not a plain Linear: the loss computes the full "
                    f"logits (the fused linear + cross-entropy needs a plain head)")
        return False

    def __call__(self, hidden: Tensor, head: nn.Module, targets: Tensor, softcap: float | None = None) -> Tensor:
        if not self.supports(head):
            return head_nll(hidden, head, targets, softcap)
        nll = linear_cross_entropy(hidden.flatten(0, 1), head.weight, head.bias, targets.flatten(), self.chunk,
                                   self.rows, softcap)  # (B*T,)
        return nll.view(targets.shape)
