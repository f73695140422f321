"""Flash attention in Triton: causal, grouped-query, packed rows, sliding windows, soft-capping, forward and
backward.

FlashAttention (Dao et al. 2022, arXiv 2205.14135; FlashAttention-2, Dao 2023, arXiv 2307.08691) computes
softmax(q k^T / sqrt(hs)) v one tile at a time, so the (T, S) score matrix never exists in memory. For a
block of queries it walks over the blocks of keys, keeping per query row a running maximum m, a running
sum l of exp(score - m) and an unnormalised output acc, rescaled whenever m grows (the "online softmax"):

    m_new = max(m, rowmax(s))      p = exp(s - m_new)      l = l * exp(m - m_new) + rowsum(p)
    acc   = acc * exp(m - m_new) + p v                     out = acc / l,   lse = m + log(l)

Backward recomputes p = exp(s - lse) tile by tile from the saved lse (B, nh, T), with
delta = rowsum(dO * O) computed first (FlashAttention-2, Algorithm 2):

    dV = p^T dO      dP = dO V^T      dS = p * (dP - delta)      dQ = dS K / sqrt(hs)      dK = dS^T Q / sqrt(hs)

in two passes that need no atomics: one program per key block accumulates dK and dV (looping over the query
blocks, and over every query head that shares its key/value head), one program per query block accumulates
dQ. Exponentials are base 2 with log2(e) folded into the scale, as in Triton's fused-attention tutorial.
Everything accumulates in fp32.

Which keys a query sees. Query i (of T) sits at position i + S - T among the S keys (S > T when a KV cache
holds earlier keys), and sees key j iff j <= i + S - T. In packed rows (nanolisa.data --pack: documents
share a row, positions restart at 0) it also needs j >= doc_start[i], the index where i's document begins;
documents are contiguous, so "same document and not in the future" is exactly that interval. The kernel reads
two (B, T) int32 vectors, doc_start and doc_end, and skips key blocks outside the interval: packing costs no
(T, T) mask and less work than an unpacked row. Rows may have any length: tiles are masked at the edges.
A sliding-window layer (Mistral, Qwen2/3, Gemma, Phi-3) also needs j > i + S - T - window: the query sees
itself and the window - 1 keys before it, again an interval, so the kernels skip every key block before the
window of a block's first query (forward, dQ) and every query block past the window of a key block's last
key (dK, dV): a long row costs O(T window), not O(T^2).
Grouped-query attention: query head h reads key/value head h // (nh // nkv) in place; K and V are never
repeated in memory.

Scores are scale * q.k (scale: hs^-1/2, or what the model gives, e.g. Gemma's query_pre_attn_scalar^-1/2).
Gemma 2 soft-caps them, s = cap tanh(scale q.k / cap), inside the tile; backward recomputes t = tanh(.) and
multiplies dS by ds/d(q.k) / scale = 1 - t^2 before the dQ and dK products.

Supports: head sizes 64, 80, 96, 128 and 256 (Gemma; 80 and 96 padded to 128 in registers); fp16, bf16, fp32
(fp32 uses IEEE fp32 dot products, never TF32); causal, packed rows (not together with a KV cache), sliding
windows, soft-capping, KV-cache decoding (T < S, forward; backward supports it too). Anything else -- another
head size or dtype, packed rows with a KV cache, a CPU tensor without TRITON_INTERPRET=1 -- goes to PyTorch's
scaled_dot_product_attention with a one-time notice.

Tested: tests/test_kernels.py, against nanolisa.model.sdpa_attention, outputs and gradients of q, k, v, on
CPU in Triton's interpreter (TRITON_INTERPRET=1, triton 3.9): fp32, fp16 and bf16, head sizes 64/80/96/128,
nkv < nh, ragged lengths, packed rows, KV-cache offsets, sliding windows (alone, packed, with a KV cache),
soft-capping, head size 256, and whole models (a training step, KV-cache
decoding). Two interpreter defects shape the bf16 test: its bf16 tl.dot gives garbage, so there the bf16
dot products run on fp32 copies of the bf16 values (the same products: bf16 x bf16 is exact in fp32), and
its fp32 -> bf16 conversion truncates where a GPU rounds, which the test's error bound absorbs. Not yet run
on a GPU: block sizes and warp counts below are untuned first guesses.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable
import triton
import triton.language as tl

from nanolisa.kernels import interpreting, notice_once
from nanolisa.model import AttentionMask, document_ids, sdpa_attention

Tensor = torch.Tensor

HEAD_SIZES = (64, 80, 96, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634
NEG = -1.0e30  # the score of a masked key: finite, so a fully masked tile gives no NaN (see _fwd_kernel)


@triton.jit
def _dot(a, b, F32: tl.constexpr, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; F32: on fp32 copies (the interpreter's bf16 dot is broken)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _visible(row, col, T, S, doc_start, window, PACKED: tl.constexpr, WINDOWED: tl.constexpr):
    """Whether query `row` sees key `col` (see the module docstring), for broadcastable index tiles: rows
    (M, 1) against columns (1, N) give an (M, N) tile, rows (1, M) against columns (N, 1) its transpose.
    doc_start: the document start of each row, shaped as `row`."""
    ok = (row < T) & (col < S) & (col <= row + (S - T))
    if PACKED:
        ok = ok & (col >= doc_start)
    if WINDOWED:
        ok = ok & (col > row + (S - T) - window)
    return ok


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _scores(qk, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """q.k products -> scores in log2 units, and (SOFTCAP) the tanh backward needs: cap tanh(scale q.k / cap)
    log2(e) with qk_scale = scale / cap and cap_log2 = cap log2(e); else scale q.k log2(e), qk_scale = scale log2(e)."""
    s = qk * qk_scale
    if SOFTCAP:
        t = _tanh(s)
        return t * cap_log2, t
    return s, s


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, DOC_START,
                sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t,
                nh, T, S, qk_scale, cap_log2, window,
                GROUP: tl.constexpr, HS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, PACKED: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
                F32: tl.constexpr, PRECISION: tl.constexpr):
    # One program: BLOCK_M queries of one (batch row, head). The last dim of q, k, v, o has stride 1.
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    hk = h // GROUP  # the key/value head this query head reads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query indices
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < T, dims < HS
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h

    # The keys any query of this block may see: [lo, hi).
    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + (S - T))  # causal: the last query's position, plus one
    lo = 0
    doc_start = rows  # unused unless PACKED
    if PACKED:
        doc_start = tl.load(DOC_START + b * T + rows, mask=row_ok, other=0)
        lo = tl.load(DOC_START + b * T + pid_m * BLOCK_M)  # the block's first query has the earliest start
    if WINDOWED:  # none before the first query's window
        lo = tl.maximum(lo, pid_m * BLOCK_M + (S - T) - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each row (log2 units)
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(s - m) v
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key indices
        col_ok = cols < S
        kT = tl.load(K + cols[None, :] * sk_t + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None],
                     other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(V + cols[:, None] * sv_t + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_D)
        s, _ = _scores(_dot(q, kT, F32, PRECISION), qk_scale, cap_log2, SOFTCAP)  # (BLOCK_M, BLOCK_N), log2
        # A masked score is NEG, not -inf: a row whose every key in this tile is masked (a packed row whose
        # document starts later) gets m = NEG and junk in l and acc, which the next visible key washes out
        # (alpha = exp2(NEG - real) = 0). Every row sees at least itself, so junk never survives.
        s = tl.where(_visible(rows[:, None], cols[None, :], T, S, doc_start[:, None], window, PACKED, WINDOWED),
                     s, NEG)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.math.exp2(m - m_new)  # rescales what was summed under the old maximum
        p = tl.math.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32, PRECISION)
        m = m_new
    acc = acc / l[:, None]
    tl.store(O + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * T + rows, m + tl.math.log2(l), mask=row_ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, so_b, so_h, so_t, sdo_b, sdo_h, sdo_t, nh, T,
                  HS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), (B, nh, T) fp32: the backward pass's preprocessing step."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < T) & (dims[None, :] < HS)
    o = tl.load(O + b * so_b + h * so_h + rows[:, None] * so_t + dims[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_t + dims[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
                 sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t,
                 sdk_b, sdk_h, sdk_t, sdv_b, sdv_h, sdv_t,
                 nh, nkv, T, S, qk_scale, sm_scale, cap_log2, window,
                 GROUP: tl.constexpr, HS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PACKED: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
                 F32: tl.constexpr, PRECISION: tl.constexpr):
    # One program: BLOCK_N keys of one (batch row, key/value head), summed over the GROUP query heads that
    # read them and over every query that sees them.
    pid_n, pid_bhk = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bhk // nkv).to(tl.int64), (pid_bhk % nkv).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key indices
    dims = tl.arange(0, BLOCK_D)
    col_ok, dim_ok = cols < S, dims < HS
    k = tl.load(K + b * sk_b + hk * sk_h + cols[:, None] * sk_t + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * sv_b + hk * sv_h + cols[:, None] * sv_t + dims[None, :],
                mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    # The queries that may see a key of this block: [lo, hi).
    lo = tl.maximum(pid_n * BLOCK_N - (S - T), 0)  # causal: none before the first key's position
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = T
    last = tl.minimum(pid_n * BLOCK_N + BLOCK_N, S) - 1  # the block's last key
    if PACKED:  # none past the end of the last key's document
        hi = tl.load(DOC_END + b * T + last)
    if WINDOWED:  # none whose window starts past the last key
        hi = tl.minimum(hi, last - (S - T) + window)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        stats = (b * nh + h) * T  # offset of this (row, head) in LSE and DELTA
        for start in range(lo, hi, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < T
            qT = tl.load(q_base + rows[None, :] * sq_t + dims[:, None], mask=row_ok[None, :] & dim_ok[:, None],
                         other=0.0)  # (BLOCK_D, BLOCK_M)
            do = tl.load(do_base + rows[:, None] * sdo_t + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                         other=0.0)  # (BLOCK_M, BLOCK_D)
            lse = tl.load(LSE + stats + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + stats + rows, mask=row_ok, other=0.0)
            doc_start = rows
            if PACKED:
                doc_start = tl.load(DOC_START + b * T + rows, mask=row_ok, other=0)
            sT, tT = _scores(_dot(k, qT, F32, PRECISION), qk_scale, cap_log2, SOFTCAP)  # (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(sT - lse[None, :])
            pT = tl.where(_visible(rows[None, :], cols[:, None], T, S, doc_start[None, :], window, PACKED,
                                   WINDOWED), pT, 0.0)
            dv += _dot(pT.to(do.dtype), do, F32, PRECISION)
            dpT = _dot(v, tl.trans(do), F32, PRECISION)  # (BLOCK_N, BLOCK_M)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:  # d(cap tanh(x / cap))/dx = 1 - tanh^2
                dsT = dsT * (1 - tT * tT)
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), F32, PRECISION)
    dk *= sm_scale
    ok = col_ok[:, None] & dim_ok[None, :]
    tl.store(DK + b * sdk_b + hk * sdk_h + cols[:, None] * sdk_t + dims[None, :], dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b * sdv_b + hk * sdv_h + cols[:, None] * sdv_t + dims[None, :], dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DOC_START,
               sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sdo_b, sdo_h, sdo_t, sdq_b, sdq_h, sdq_t,
               nh, T, S, qk_scale, sm_scale, cap_log2, window,
               GROUP: tl.constexpr, HS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, PACKED: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
               F32: tl.constexpr, PRECISION: tl.constexpr):
    # One program: BLOCK_M queries of one (batch row, head); the same key range as the forward pass.
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // nh).to(tl.int64), (pid_bh % nh).to(tl.int64)
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < T, dims < HS
    ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_t + dims[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_t + dims[None, :], mask=ok, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + rows, mask=row_ok, other=0.0)
    K += b * sk_b + hk * sk_h
    V += b * sv_b + hk * sv_h

    hi = tl.minimum(S, (pid_m + 1) * BLOCK_M + (S - T))
    lo = 0
    doc_start = rows
    if PACKED:
        doc_start = tl.load(DOC_START + b * T + rows, mask=row_ok, other=0)
        lo = tl.load(DOC_START + b * T + pid_m * BLOCK_M)
    if WINDOWED:
        lo = tl.maximum(lo, pid_m * BLOCK_M + (S - T) - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < S
        kT = tl.load(K + cols[None, :] * sk_t + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        vT = tl.load(V + cols[None, :] * sv_t + dims[:, None], mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
        s, t = _scores(_dot(q, kT, F32, PRECISION), qk_scale, cap_log2, SOFTCAP)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(_visible(rows[:, None], cols[None, :], T, S, doc_start[:, None], window, PACKED, WINDOWED),
                     p, 0.0)
        dp = _dot(do, vT, F32, PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1 - t * t)
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), F32, PRECISION)
    dq *= sm_scale
    tl.store(DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_t + dims[None, :], dq.to(DQ.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------------


def _strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, head, token) strides of a (B, n, T, hs) tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _launch_config(hs: int, dtype: torch.dtype) -> dict:
    F32 = interpreting() and dtype == torch.bfloat16
    precision = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for fp16/bf16 inputs
    block_d = triton.next_power_of_2(hs)
    if interpreting():  # small tiles, so that short test sequences still cross several of them
        blocks = dict(fwd=(16, 16), dkdv=(16, 16), dq=(16, 16), warps=1)
    elif block_d <= 128:  # untuned first guesses (no GPU was available while writing this)
        blocks = dict(fwd=(64, 64), dkdv=(32, 64 if block_d <= 64 else 32), dq=(64, 32), warps=4)
    else:  # head size 256 (Gemma): smaller tiles, more warps, so a tile's registers fit; also untuned
        blocks = dict(fwd=(64, 32), dkdv=(32, 32), dq=(32, 32), warps=8)
    return dict(F32=F32, PRECISION=precision, BLOCK_D=block_d, **blocks)


class FlashAttention(torch.autograd.Function):
    """q (B, nh, T, hs), k and v (B, nkv, S, hs), doc_start / doc_end (B, T) int32 or None, the q.k scale,
    soft-cap and sliding window (None: none) -> (B, nh, T, hs)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor | None, doc_end: Tensor | None,
                scale: float | None = None, softcap: float | None = None, window: int | None = None) -> Tensor:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        B, nh, T, hs = q.shape
        nkv, S = k.size(1), k.size(2)
        cfg = _launch_config(hs, q.dtype)
        packed = doc_start is not None
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        doc_start_arg = doc_start if packed else dummy
        o = torch.empty_like(q)  # same strides as q: (B, T, nh, hs) memory when q is a transposed view
        lse = torch.empty(B, nh, T, dtype=torch.float32, device=q.device)
        sm_scale = 1.0 / math.sqrt(hs) if scale is None else scale
        # scores: scale q.k, or cap tanh(scale q.k / cap); in log2 units (see _scores)
        qk_scale, cap_log2 = (sm_scale * LOG2E, 0.0) if softcap is None else (sm_scale / softcap, softcap * LOG2E)
        cfg.update(PACKED=packed, WINDOWED=window is not None, SOFTCAP=softcap is not None)
        BLOCK_M, BLOCK_N = cfg["fwd"]
        _fwd_kernel[(triton.cdiv(T, BLOCK_M), B * nh)](
            q, k, v, o, lse, doc_start_arg, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            nh, T, S, qk_scale, cap_log2, window or 0,
            GROUP=nh // nkv, HS=hs, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PACKED=packed,
            WINDOWED=cfg["WINDOWED"], SOFTCAP=cfg["SOFTCAP"], F32=cfg["F32"], PRECISION=cfg["PRECISION"],
            num_warps=cfg["warps"])
        ctx.save_for_backward(q, k, v, o, lse, doc_start, doc_end)
        ctx.cfg, ctx.sm_scale, ctx.qk_scale, ctx.cap_log2, ctx.window = cfg, sm_scale, qk_scale, cap_log2, window or 0
        return o

    @staticmethod
    @once_differentiable  # backward is not itself differentiable: a second derivative is a clear error
    def backward(ctx, do: Tensor):
        q, k, v, o, lse, doc_start, doc_end = ctx.saved_tensors
        cfg, sm_scale = ctx.cfg, ctx.sm_scale
        do = do if do.stride(-1) == 1 else do.contiguous()
        B, nh, T, hs = q.shape
        nkv, S = k.size(1), k.size(2)
        packed = doc_start is not None
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        doc_start_arg, doc_end_arg = (doc_start, doc_end) if packed else (dummy, dummy)
        common = dict(GROUP=nh // nkv, HS=hs, BLOCK_D=cfg["BLOCK_D"], PACKED=packed, WINDOWED=cfg["WINDOWED"],
                      SOFTCAP=cfg["SOFTCAP"], F32=cfg["F32"], PRECISION=cfg["PRECISION"], num_warps=cfg["warps"])
        scores = (ctx.qk_scale, sm_scale, ctx.cap_log2, ctx.window)

        delta = torch.empty_like(lse)  # (B, nh, T)
        _delta_kernel[(triton.cdiv(T, 64), B * nh)](o, do, delta, *_strides(o), *_strides(do), nh, T,
                                                    HS=hs, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=64)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        BLOCK_M, BLOCK_N = cfg["dkdv"]
        _dkdv_kernel[(triton.cdiv(S, BLOCK_N), B * nkv)](
            q, k, v, do, lse, delta, dk, dv, doc_start_arg, doc_end_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            nh, nkv, T, S, *scores, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **common)
        BLOCK_M, BLOCK_N = cfg["dq"]
        _dq_kernel[(triton.cdiv(T, BLOCK_M), B * nh)](
            q, k, v, do, lse, delta, dq, doc_start_arg,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            nh, T, S, *scores, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **common)
        return dq, dk, dv, None, None, None, None, None


def document_bounds(position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For packed rows (B, T): where each token's document starts and ends (one past its last token),
    both (B, T) int32. Documents as model.py defines them: a new one begins where a position is 0."""
    doc = document_ids(position_ids)  # (B, T), non-decreasing along each row
    B, T = doc.shape
    idx = torch.arange(T, device=doc.device).expand(B, T)
    new = torch.ones_like(doc, dtype=torch.bool)
    new[:, 1:] = doc[:, 1:] != doc[:, :-1]  # the first token of a document
    start = torch.where(new, idx, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]  # the last token of a document
    end = torch.where(last, idx + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def unsupported(q: Tensor, k: Tensor, mask: AttentionMask) -> str | None:
    """Why the kernel cannot take this call (then SDPA does), or None."""
    if q.size(-1) not in HEAD_SIZES:
        return f"head size {q.size(-1)} (the kernel takes {', '.join(map(str, HEAD_SIZES))})"
    if q.dtype not in DTYPES or k.dtype != q.dtype:
        return f"dtype {q.dtype}"
    if mask.packed and k.size(2) != q.size(2):
        return "packed rows with a KV cache"
    if q.device.type != "cuda" and not interpreting():
        return f"{q.device.type} tensors without TRITON_INTERPRET=1"
    return None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None,
                    softcap: float | None = None) -> Tensor:
    """The model's attention function (model.set_attention): q (B, nh, T, hs), k and v (B, nkv, S, hs)."""
    why = unsupported(q, k, mask)
    if why is not None:
        notice_once(f"flash attention does not support {why}: using PyTorch's scaled_dot_product_attention")
        return sdpa_attention(q, k, v, mask, scale, softcap)
    doc_start = doc_end = None
    if mask.packed:
        doc_start, doc_end = mask.cached("document_bounds", lambda: document_bounds(mask.position_ids))
    return FlashAttention.apply(q, k, v, doc_start, doc_end, scale, softcap, mask.window)
