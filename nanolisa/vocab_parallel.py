"""The LM head and its loss split by vocabulary over FSDP2's ranks: no rank ever holds the whole head.

FSDP2 gathers a unit's weights for forward and backward and reduce-scatters its gradient. For the LM head,
the largest tensor of a Llama (vocab x C: 32000 x 4096, 131M parameters), that puts on every rank at the
start of backward the whole head in the compute dtype, its whole fp32 gradient from the fused loss and a
reduce-scatter buffer as large: the per-rank peak of a LISA run, where few blocks train. A vocabulary-parallel
loss (Megatron-LM's parallel cross-entropy, here on FSDP2's own shards) moves the small thing instead, the
hidden states of the step's tokens (n x C per rank):

    rank r holds W_r, rows [r c, (r + 1) c) of the head, c = ceil(V / N): FSDP2's own shard (a DTensor,
    Shard(0)), so loading, AdamW, gradient norms, checkpoints and the saved model treat it like any other.

    for each rank q in turn: h_q = broadcast from rank q, then chunk by chunk of its tokens
        z_r  = h_q W_r^T                         (chunk, c): this rank's columns of the logits
        lse  = log sum_r sum exp(z_r)            the max and the sum of exponentials all-reduced per token
        loss = lse - z[target]                   the target's logit from the rank that holds its row
        dz_r = g (exp(z_r - lse) - onehot_r)     while the chunk's logits are at hand
        dW_r += dz_r^T h_q / N                   this rank's rows of the gradient: nothing to reduce
        dh_q = sum over r of dz_r W_r            reduced to rank q (n_q x C, fp32)

Forward does all of it for g = 1 and keeps each rank's losses, dh and dW_r; backward all-gathers g and
scales them when g is one number for every token of every rank (every training step: the loss is a sum
divided by the step's token count), or else goes through the ranks' tokens again with each token's g.
The division by N is FSDP2's averaging: each rank's loss carries a factor N (nanolisa/parallel.py), so the
average over ranks is the gradient of one process with the whole batch. Compared with FSDP2's head unit, a
rank holds W_r and dW_r (2 V C / N numbers in fp32, not ~3 V C) and one other rank's hidden states at a
time, whatever the number of ranks. Traffic: a rank receives about 6 N n C bytes under bf16 (the hidden
states, the fp32 parts of dL/dh) where FSDP2's head unit moves 6 V C (the head in bf16, its gradient in
fp32): less while the step's tokens on all ranks, N n, stay below the vocabulary size, more beyond.

Used for an untied head without bias (Llama, Qwen, Mistral, ...); a tied head shares the embedding's
Parameter, which FSDP2 keeps in one unit (nanolisa/parallel.py `shard`). Tested against one process in
tests/test_distributed.py (training, evaluation, kill and resume).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from nanolisa.kernels.linear_cross_entropy import add_outer_, default_chunk
from nanolisa.loss import IGNORE_INDEX
from nanolisa.parallel import chunk_rows

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
    start, stop = chunk_rows(w.size(0), mesh.size(), mesh.get_local_rank())
    mine = w.detach()[start:stop].clone()  # (c, C), or fewer rows on the last ranks
    shard = DTensor.from_local(mine, mesh, [Shard(0)], run_check=False, shape=w.shape, stride=w.stride())
    head.weight = nn.Parameter(shard, requires_grad=w.requires_grad)
    head.__class__ = SplitHead
    model.head_loss = vocab_parallel_nll


class SplitHead(nn.Linear):
    """The LM head with this rank's rows only. Logits (a caller that wants them, e.g. generation) need every
    row: the weight is gathered for that call. The training and evaluation loss never gathers it."""

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C) -> (B, T, V)
        return F.linear(x, self.weight.full_tensor().to(x.dtype))


def vocab_parallel_nll(hidden: Tensor, head: nn.Module, targets: Tensor, softcap: float | None = None) -> Tensor:
    """The model's head_loss with a split head: hidden (B, T, C), targets (B, T) -> NLL (B, T) fp32, 0 where
    the target is IGNORE_INDEX; equal to nanolisa.loss.head_nll with the whole head. Every rank must call it
    (it is collective); tokens without a target are dropped before anything is exchanged."""
    w = head.weight
    h, t = hidden.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
    keep = (t != IGNORE_INDEX).nonzero()[:, 0]  # (n,)
    nll = _VocabParallelNLL.apply(h[keep], w.to_local(), t[keep], w.size(0), w.device_mesh.get_group(), softcap,
                                  torch.is_grad_enabled())
    return hidden.new_zeros(t.shape, dtype=torch.float32).index_put((keep,), nll).view(targets.shape)


class _VocabParallelNLL(torch.autograd.Function):
    """h (n, C) this rank's tokens, w (c, C) this rank's rows, targets (n,) -> NLL (n,) fp32.

    As the one-process fused loss does, forward also computes the gradients for g = 1 while each chunk's
    logits are at hand, and backward scales them by g when g is one number for every token of every rank --
    every training step, whose loss is a sum divided by the step's token count. For any other g, backward
    computes each chunk's logits again."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, vocab: int, group, softcap: float | None,
                need_grad: bool) -> Tensor:
        rank = dist.get_rank(group)
        counts = _all_rows(torch.tensor([h.size(0)], device=h.device), group).tolist()  # n_r of each rank
        most = max(counts)  # every rank's per-token numbers below are padded to m: rank r's from r m on
        T = _all_rows(F.pad(targets, (0, most - h.size(0)), value=IGNORE_INDEX), group)  # (N m,)
        start = chunk_rows(vocab, len(counts), rank)[0]  # the first vocabulary row this rank holds
        wc = w.to(h.dtype)  # the compute dtype: FSDP2's bf16 under mixed precision
        loss, lse = (torch.zeros(len(T), dtype=torch.float32, device=h.device) for _ in range(2))
        grads = _new_grads(h, wc, ctx.needs_input_grad[:2] if need_grad else (False, False))
        ones = torch.ones(len(T), dtype=torch.float32, device=h.device)
        _sweep(h, wc, T, counts, start, group, softcap, lse, ones, *grads, loss=loss)
        ctx.save_for_backward(h, wc, T, lse)
        ctx.start, ctx.counts, ctx.group, ctx.softcap, ctx.w_dtype = start, counts, group, softcap, w.dtype
        ctx.grads = grads if need_grad else None  # for g = 1, until backward scales them
        return loss[rank * most:rank * most + h.size(0)]  # this rank's tokens

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):  # g (n,): dL/dloss of each of this rank's tokens
        h, wc, T, lse = ctx.saved_tensors
        group, counts = ctx.group, ctx.counts
        G = _all_rows(F.pad(g.float(), (0, max(counts) - h.size(0))), group)  # (N m,): every rank's g
        tokens = G[T != IGNORE_INDEX]  # the same on every rank, so every rank takes the same branch
        grads, ctx.grads = ctx.grads, None  # used once: a second backward (retain_graph) recomputes
        if grads is not None and (len(tokens) == 0 or bool((tokens == tokens[0]).all())):
            for t in grads:  # one g for every token: scale forward's gradients
                if t is not None and len(tokens):
                    t.mul_(tokens[0])
        else:  # compute each chunk's logits again and weight its softmax gradient by each token's g
            grads = _new_grads(h, wc, ctx.needs_input_grad[:2])
            _sweep(h, wc, T, counts, ctx.start, group, ctx.softcap, lse, G, *grads)
        dh, dW = grads
        dW = None if dW is None else dW.div_(len(counts)).to(ctx.w_dtype)  # FSDP2 averages over the ranks
        return None if dh is None else dh.to(h.dtype), dW, None, None, None, None, None


def _new_grads(h: Tensor, wc: Tensor, need) -> list[Tensor | None]:
    """Zeroed [dL/dh of this rank's tokens, this rank's rows of dL/dW], fp32, None where not needed."""
    return [torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need[0] else None,
            torch.zeros(wc.shape, dtype=torch.float32, device=wc.device) if need[1] else None]


def _sweep(h: Tensor, wc: Tensor, T: Tensor, counts: list[int], start: int, group, softcap: float | None,
           lse: Tensor, G: Tensor, dh: Tensor | None, dW: Tensor | None, loss: Tensor | None = None) -> None:
    """One pass over every rank's tokens, chunk by chunk, on this rank's columns of the logits. Forward (loss
    given): fill lse and loss of every token, reducing each chunk's max and sum of exponentials over the
    ranks; otherwise (a recomputing backward) read lse. Then add the G-weighted gradients: this rank's rows
    of dW, and dL/dh of each rank's tokens, summed over the ranks onto that rank (this rank's in dh)."""
    rank, most, C = dist.get_rank(group), max(counts), h.size(1)
    need = dh is not None or dW is not None
    part = None  # this rank's columns' part of dL/dh of the tokens of the rank at hand
    for s, e, hc in _every_ranks_chunks(h, counts, default_chunk(wc.size(0)), group):
        r = s // most
        z, slope = _logits(hc, wc, softcap, need_slope=need)  # (chunk, c) fp32
        here = T[s:e] - start
        mine = (here >= 0) & (here < wc.size(0))  # targets whose row this rank holds
        if loss is not None:  # log sum exp over the whole vocabulary: every rank's columns
            z_target = torch.where(mine, z.gather(1, here.clamp(0, wc.size(0) - 1)[:, None])[:, 0], 0.0)
            top = z.amax(dim=-1)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            p = z.sub_(top[:, None]).exp_()  # exp(z - the largest logit of the token), (chunk, c)
            sums = torch.stack([p.sum(-1), z_target])  # (2, chunk)
            dist.all_reduce(sums, group=group)
            lse[s:e] = sums[0].log().add_(top)
            loss[s:e] = lse[s:e] - sums[1]
            p = p.div_(sums[0][:, None]) if need else None  # the softmax, this rank's columns
        else:
            p = z.sub_(lse[s:e, None]).exp_()
        if not need:
            continue
        rows = mine.nonzero()[:, 0]
        p[rows, here[rows]] -= 1.0
        dz = p.mul_(G[s:e, None])  # dL/dz = g (softmax - onehot)
        if slope is not None:
            dz = dz.mul_(slope)
        dz = dz.to(wc.dtype)
        if dW is not None:
            add_outer_(dW, dz, hc)  # (c, C), summed in fp32
        if dh is not None:
            if part is None:
                part = dh if r == rank else torch.zeros(counts[r], C, dtype=torch.float32, device=h.device)
            part[s - r * most:e - r * most] = dz @ wc  # (chunk, C)
            if e == r * most + counts[r]:  # rank r's last chunk: its tokens' dL/dh, summed over the ranks
                dist.reduce(part, dst=dist.get_global_rank(group, r), group=group)
                part = None


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
