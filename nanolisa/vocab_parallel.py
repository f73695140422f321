"""The LM head and its loss split by vocabulary over FSDP2's ranks: no rank ever holds the whole head.

FSDP2 gathers a unit's weights for forward and backward and reduce-scatters its gradient. For the LM head,
the largest tensor of a Llama (vocab x C: 32000 x 4096, 131M parameters), that puts on every rank at the
start of backward the whole head in the compute dtype, its whole fp32 gradient from the fused loss and a
reduce-scatter buffer as large: the per-rank peak of a LISA run, where few blocks train. A vocabulary-parallel
loss (Megatron-LM's parallel cross-entropy, here on FSDP2's own shards) moves the small thing instead, the
hidden states of the step's tokens (n x C per rank):

    rank r holds W_r, rows [r c, (r + 1) c) of the head, c = ceil(V / N): FSDP2's own shard (a DTensor,
    Shard(0)), so loading, AdamW, gradient norms, checkpoints and the saved model treat it like any other.

    forward    for each rank q in turn: h_q = broadcast from rank q       (n_q, C)
               z_r = h_q W_r^T, chunk by chunk                            (chunk, c) never all at once
               lse_r = logsumexp(z_r); the target's logit, where W_r holds its row
               lse = log sum_r exp(lse_r)      two all-reduces of N n numbers
               loss = lse - z[target]          each rank keeps its own tokens' losses
    backward   G = all_gather(g)               dL/dloss of every rank's tokens
               for each rank q in turn: h_q broadcast again, and chunk by chunk
               dz_r = G (exp(z_r - lse) - onehot_r)       the chunk's logits computed again
               dW_r += dz_r^T h_q / N          this rank's rows of the gradient: nothing to reduce
               dh_q = sum over r of dz_r W_r   reduced to rank q (n_q x C, fp32)

The division by N is FSDP2's averaging: each rank's loss carries a factor N (nanolisa/parallel.py), so the
average over ranks is the gradient of one process with the whole batch. Compared with FSDP2's head unit, a
rank holds W_r and dW_r (2 V C / N numbers in fp32, not ~3 V C) and one other rank's hidden states at a
time, whatever the number of ranks. Traffic: a rank receives about 8 N n C bytes under bf16 (the hidden
states twice, the fp32 parts of dL/dh once) where FSDP2's head unit moves 6 V C (the head in bf16, its
gradient in fp32): less while the step's tokens on all ranks, N n, stay below 3/4 of the vocabulary (96k
tokens at Llama 3's 128k), more beyond. The price in compute is one head matmul more: backward computes each
chunk's logits again (exact for any g), where the fused one-process loss (kernels/linear_cross_entropy.py)
computes its gradients during forward.

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
        rank = dist.get_rank(group)
        counts = _all_rows(torch.tensor([h.size(0)], device=h.device), group).tolist()  # n_r of each rank
        most = max(counts)  # every rank's per-token numbers below are padded to m: rank r's from r m on
        T = _all_rows(F.pad(targets, (0, most - h.size(0)), value=IGNORE_INDEX), group)  # (N m,)
        start = rank * -(-vocab // len(counts))  # the first vocabulary row this rank holds
        lse = torch.zeros(len(T), dtype=torch.float32, device=h.device)  # this rank's logsumexp, then everyone's
        z_target = torch.zeros(len(T), dtype=torch.float32, device=h.device)
        wc = w.to(h.dtype)  # the compute dtype: FSDP2's bf16 under mixed precision
        for s, e, hc in _every_ranks_chunks(h, counts, default_chunk(w.size(0)), group):
            z = _logits(hc, wc, softcap)[0]  # (chunk, c) fp32
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
        ctx.save_for_backward(h, wc, T, lse)
        ctx.start, ctx.counts, ctx.group, ctx.softcap, ctx.w_dtype = start, counts, group, softcap, w.dtype
        return (lse - sums[1])[rank * most:rank * most + h.size(0)]  # this rank's tokens

    @staticmethod
    def backward(ctx, g: Tensor):  # g (n,): dL/dloss of each of this rank's tokens
        h, wc, T, lse = ctx.saved_tensors
        group, start, counts = ctx.group, ctx.start, ctx.counts
        N, rank, most = len(counts), dist.get_rank(group), max(counts)
        G = _all_rows(F.pad(g.float(), (0, most - h.size(0))), group)  # (N m,)
        dW = torch.zeros(wc.shape, dtype=torch.float32, device=wc.device) if ctx.needs_input_grad[1] else None
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        part = None  # this rank's columns' part of dL/dh of the tokens of the rank at hand, then summed there
        for s, e, hc in _every_ranks_chunks(h, counts, default_chunk(wc.size(0)), group):
            r = s // most
            if part is None:
                part = dh if r == rank else torch.zeros(counts[r], h.size(1), dtype=torch.float32, device=h.device)
            z, slope = _logits(hc, wc, ctx.softcap, need_slope=True)  # (chunk, c) fp32
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
                add_outer_(dW, dz, hc)  # (c, C), summed in fp32
            if e == r * most + counts[r]:  # rank r's last chunk: its tokens' dL/dh, summed over the ranks
                dist.reduce(part, dst=dist.get_global_rank(group, r), group=group)
                part = None
        dW = None if dW is None else dW.div_(N).to(ctx.w_dtype)  # FSDP2 averages gradients over the ranks
        return dh.to(h.dtype), dW, None, None, None, None


def _every_ranks_chunks(h: Tensor, counts: list[int], chunk: int, group):
    """Yield (start, end, hidden states) of each chunk of every rank's tokens, rank by rank: rank r's n_r
    tokens are rows [r m, r m + n_r) of the per-token numbers (m = the largest n_r). Each rank's hidden
    states are broadcast from it when its turn comes: a rank holds one other rank's tokens at a time, never
    all N n of them, however many ranks there are."""
    rank = dist.get_rank(group)
    for r, n in enumerate(counts):
        if n == 0:
            continue
        theirs = h if r == rank else h.new_empty(n, h.size(1))
        dist.broadcast(theirs, src=dist.get_global_rank(group, r), group=group)
        for s in range(0, n, chunk):
            yield r * max(counts) + s, r * max(counts) + min(s + chunk, n), theirs[s:s + chunk]


def _logits(h: Tensor, w: Tensor, softcap: float | None, need_slope: bool = False) -> tuple[Tensor, Tensor | None]:
    """h (c', C) @ w (c, C)^T in fp32 (c', c), soft-capped when softcap is given (Gemma 2), with the cap's
    slope dz'/dz = 1 - (z' / softcap)^2 for backward."""
    z = F.linear(h, w).float()
    if softcap is None:
        return z, None
    tanh = z.div_(softcap).tanh_()
    slope = tanh.square().neg_().add_(1.0) if need_slope else None
    return tanh.mul_(softcap), slope


def _all_rows(x: Tensor, group) -> Tensor:
    """all_gather of equal-shaped x (m, ...) from every rank, stacked in rank order: (N m, ...)."""
    out = x.new_empty((dist.get_world_size(group) * x.size(0), *x.shape[1:]))
    dist.all_gather_single(out, x.contiguous(), group=group)
    return out
