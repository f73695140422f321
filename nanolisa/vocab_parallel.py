"""The LM head and its loss split by vocabulary over FSDP2's ranks: no rank ever holds the whole head.

FSDP2 gathers a unit's weights for forward and backward and reduce-scatters its gradient. For the LM head,
the largest tensor of a Llama (vocab x C: 32000 x 4096, 131M parameters), that puts on every rank at the
start of backward the whole head in the compute dtype, its whole fp32 gradient from the fused loss and a
reduce-scatter buffer as large: the per-rank peak of a LISA run, where few blocks train. A vocabulary-parallel
loss (Megatron-LM's parallel cross-entropy, here on FSDP2's own shards) moves the small thing instead, the
hidden states of the step's tokens (n x C per rank):

    rank r holds W_r, rows [r c, (r + 1) c) of the head, c = ceil(V / N): FSDP2's own shard (a DTensor,
    Shard(0)), so loading, AdamW, gradient norms, checkpoints and the saved model treat it like any other.

    forward    H   = all_gather(h)                        (N n, C)    every rank's tokens
               z_r = H W_r^T                              (N n, c)    chunk by chunk, never all at once
               lse = log sum_r exp(logsumexp(z_r))        (N n,)      two all-reduces of N n numbers
               loss = lse - z[target]                     the target's logit from the rank holding its row
    backward   G   = all_gather(g)                        dL/dloss of every rank's tokens
               dz_r = G (exp(z_r - lse) - onehot_r)       the chunk's logits computed again
               dW_r = dz_r^T H / N                        this rank's rows of the gradient: nothing to reduce
               dh  = sum over ranks of dz_r W_r           reduced to the rank whose tokens they are,
                                                          one rank's tokens at a time (n x C fp32 each)

The division by N is FSDP2's averaging: each rank's loss carries a factor N (nanolisa/parallel.py), so the
average over ranks is the gradient of one process with the whole batch. Compared with FSDP2's head unit, a
rank holds W_r, dW_r and every rank's hidden states (2 V C / N + N n C numbers, not ~3 V C) and moves
about N n C numbers, not V C.
The price is one more head matmul: backward computes each chunk's logits again (exact for any g), where
the fused one-process loss (kernels/linear_cross_entropy.py) computes its gradients during forward.

Used for an untied head without bias (Llama, Qwen, Mistral, ...); a tied head shares the embedding's
Parameter, which FSDP2 keeps in one unit (nanolisa/parallel.py `shard`). Tested against one process in
tests/test_distributed.py (training, evaluation, kill and resume).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanolisa.kernels.linear_cross_entropy import add_outer_, default_chunk
from nanolisa.loss import IGNORE_INDEX

Tensor = torch.Tensor


def can_split(head: nn.Module) -> bool:
    """Whether the head is a plain bias-free nn.Linear (a LoRALinear head keeps FSDP2's unit)."""
    return type(head) is nn.Linear and head.bias is None


def split_head(model: nn.Module, mesh) -> None:
    """Make model.lm_head's weight this rank's rows, a DTensor sharded over `mesh` as FSDP2 shards (on the
    meta device too, before loading), and route the model's loss through vocab_parallel_nll. The caller
    keeps the weight out of FSDP2's units (`ignored_params`)."""
    from torch.distributed.tensor import DTensor, Shard
    head = model.lm_head
    w = head.weight
    n, rank = mesh.size(), mesh.get_local_rank()
    rows = -(-w.size(0) // n)
    mine = w.detach()[rank * rows:(rank + 1) * rows].clone()  # (c, C), or fewer rows on the last ranks
    shard = DTensor.from_local(mine, mesh, [Shard(0)], run_check=False, shape=w.shape, stride=w.stride())
    head.weight = nn.Parameter(shard, requires_grad=w.requires_grad)
    head.__class__ = SplitHead
    model.head_loss = vocab_parallel_nll


class SplitHead(nn.Linear):
    """The LM head with this rank's rows only. Logits (generation, the first forward that sets FSDP2 up)
    need every row: the weight is gathered for that call. The training and evaluation loss never does."""

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, V)
        return F.linear(x, self.weight.full_tensor().to(x.dtype))


def vocab_parallel_nll(hidden: Tensor, head: nn.Module, targets: Tensor, softcap: float | None = None) -> Tensor:
    """The model's head_loss with a split head: hidden (B, T, C), targets (B, T) -> NLL (B, T) fp32, 0 where
    the target is IGNORE_INDEX; equal to nanolisa.loss.head_nll with the whole head. Every rank must call it
    (it is collective); tokens without a target are dropped before anything is exchanged."""
    w = head.weight
    h, t = hidden.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
    keep = (t != IGNORE_INDEX).nonzero()[:, 0]  # (n,)
    nll = _VocabParallelNLL.apply(h[keep], w.to_local(), t[keep], w.size(0), w.device_mesh.get_group(), softcap)
    return hidden.new_zeros(t.shape, dtype=torch.float32).index_put((keep,), nll).view(targets.shape)


class _VocabParallelNLL(torch.autograd.Function):
    """h (n, C) this rank's tokens, w (c, C) this rank's rows, targets (n,) -> NLL (n,) fp32."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, vocab: int, group, softcap: float | None) -> Tensor:
        N, rank = dist.get_world_size(group), dist.get_rank(group)
        H, T, counts = _all_tokens(h, targets, group)  # (N m, C), (N m,): rank r's n_r tokens from row r m on
        most = len(T) // N
        start = rank * -(-vocab // N)  # the first vocabulary row this rank holds
        lse = torch.zeros(len(T), dtype=torch.float32, device=h.device)  # this rank's logsumexp, then everyone's
        z_target = torch.zeros(len(T), dtype=torch.float32, device=h.device)
        wc = w.to(h.dtype)  # the compute dtype: FSDP2's bf16 under mixed precision
        for _, s, e in _spans(counts, most, default_chunk(w.size(0))):
            z = _logits(H[s:e], wc, softcap)[0]  # (chunk, c) fp32
            here = T[s:e] - start
            mine = (here >= 0) & (here < w.size(0))  # targets whose row this rank holds
            z_target[s:e] = torch.where(mine, z.gather(1, here.clamp(0, w.size(0) - 1)[:, None])[:, 0], 0.0)
            m = z.amax(dim=-1, keepdim=True)
            lse[s:e] = z.sub_(m).exp_().sum(-1).log_().add_(m[:, 0])
        top = lse.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([(lse - top).exp_(), z_target])  # (2, N m)
        dist.all_reduce(sums, group=group)
        lse = sums[0].log_().add_(top)  # log sum over the whole vocabulary, (N m,)
        ctx.save_for_backward(H, wc, T, lse)
        ctx.start, ctx.counts, ctx.group, ctx.softcap, ctx.w_dtype = start, counts, group, softcap, w.dtype
        return (lse - sums[1])[rank * most:rank * most + counts[rank]]  # this rank's tokens

    @staticmethod
    def backward(ctx, g: Tensor):  # g (n,): dL/dloss of each of this rank's tokens
        H, wc, T, lse = ctx.saved_tensors
        group, start, counts = ctx.group, ctx.start, ctx.counts
        N, rank, C = dist.get_world_size(group), dist.get_rank(group), H.size(1)
        most = len(T) // N
        G = _all_rows(F.pad(g.float(), (0, most - counts[rank])), group)  # (N m,)
        dW = torch.zeros(wc.shape, dtype=torch.float32, device=wc.device) if ctx.needs_input_grad[1] else None
        spans = _spans(counts, most, default_chunk(wc.size(0)))
        dh = None
        for r in range(N):  # rank r's tokens: this rank's columns' part of their dL/dh, summed on rank r
            part = torch.zeros(counts[r], C, dtype=torch.float32, device=H.device)
            for _, s, e in (x for x in spans if x[0] == r):
                z, slope = _logits(H[s:e], wc, ctx.softcap, need_slope=True)  # (chunk, c) fp32
                p = z.sub_(lse[s:e, None]).exp_()  # the softmax over the whole vocabulary, this rank's columns
                here = T[s:e] - start
                mine = ((here >= 0) & (here < wc.size(0))).nonzero()[:, 0]
                p[mine, here[mine]] -= 1.0
                dz = p.mul_(G[s:e, None])
                if slope is not None:
                    dz = dz.mul_(slope)
                dz = dz.to(wc.dtype)
                part[s - r * most:e - r * most] = dz @ wc  # (chunk, C)
                if dW is not None:
                    add_outer_(dW, dz, H[s:e])  # (c, C), summed in fp32
            dist.reduce(part, dst=dist.get_global_rank(group, r), group=group)
            if r == rank:
                dh = part
        dW = None if dW is None else dW.div_(N).to(ctx.w_dtype)  # FSDP2 averages gradients over the ranks
        return dh.to(H.dtype), dW, None, None, None, None


def _spans(counts: list[int], most: int, chunk: int) -> list[tuple[int, int, int]]:
    """(rank, start, end) of each chunk of the gathered rows that hold a token: rank r's n_r tokens are rows
    [r m, r m + n_r), the rest of its m rows padding."""
    return [(r, s, min(s + chunk, r * most + n)) for r, n in enumerate(counts)
            for s in range(r * most, r * most + n, chunk)]


def _logits(h: Tensor, w: Tensor, softcap: float | None, need_slope: bool = False) -> tuple[Tensor, Tensor | None]:
    """h (c', C) @ w (c, C)^T in fp32 (c', c), soft-capped when softcap is given (Gemma 2), with the cap's
    slope dz'/dz = 1 - (z' / softcap)^2 for backward."""
    z = F.linear(h, w).float()
    if softcap is None:
        return z, None
    tanh = z.div_(softcap).tanh_()
    slope = tanh.square().neg_().add_(1.0) if need_slope else None
    return tanh.mul_(softcap), slope


def _all_tokens(h: Tensor, targets: Tensor, group) -> tuple[Tensor, Tensor, list[int]]:
    """Every rank's hidden states and targets, each rank's padded to the longest count m: (N m, C), (N m,),
    and each rank's count."""
    counts = _all_rows(torch.tensor([h.size(0)], device=h.device), group).tolist()
    pad = max(counts) - h.size(0)
    return (_all_rows(F.pad(h, (0, 0, 0, pad)), group),
            _all_rows(F.pad(targets, (0, pad), value=IGNORE_INDEX), group), counts)


def _all_rows(x: Tensor, group) -> Tensor:
    """all_gather of equal-shaped x (m, ...) from every rank, stacked in rank order: (N m, ...)."""
    out = x.new_empty((dist.get_world_size(group) * x.size(0), *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out
