"""Run by tests/test_distributed.py under torchrun: nanolisa/vocab_parallel.py's loss on 2 ranks against the
whole head in float64 on one process, and the one-process fused loss (what FSDP2's head unit ran) against
the same reference. Rank 0 prints one JSON line per case: the largest relative errors of the loss, dL/dh
and dL/dW of each."""
import json

import torch
import torch.distributed as dist
import torch.nn as nn

from nanolisa import vocab_parallel
from nanolisa.kernels.linear_cross_entropy import default_chunk, linear_cross_entropy
from nanolisa.loss import IGNORE_INDEX, head_nll
from nanolisa.parallel import gather, init_world
from nanolisa.vocab_parallel import split_head
from probe_exit import finish


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest error of a against b, relative to b's largest magnitude."""
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def case(V: int, C: int, counts: list[int], dtype: torch.dtype, softcap: float | None, uniform: bool,
         chunk: int | None = None) -> dict:
    """chunk: tokens per chunk instead of vocab_parallel's default (64 MB of logits: thousands of tokens at
    these vocabularies), so that each rank's tokens take several chunks, the last one shorter."""
    vocab_parallel.default_chunk = (lambda rows: chunk) if chunk else default_chunk
    torch.manual_seed(0)  # the same global batch on every rank
    n = sum(counts)
    w = torch.randn(V, C) * C ** -0.5
    h = torch.randn(n, C)
    t = torch.randint(0, V, (n,))
    t[::5] = IGNORE_INDEX  # tokens without a loss
    # dL/dloss: one number for every token (a training step: forward's gradients, scaled), or a different
    # weight per token (backward computes the logits again)
    g = torch.full((n,), 0.75) if uniform else torch.rand(n) + 0.5
    # The reference: the whole head on the whole batch, float64.
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = head_nll(h64[None], lambda x: x @ w64.t(), t[None], softcap)[0]
    (ref * g).sum().backward()
    # One process's fused loss, as FSDP2's head unit ran it (compute dtype `dtype`, the fp32 master gradient).
    hf, wf = h.to(dtype).clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
        fused = linear_cross_entropy(hf, wf, None, t, softcap=softcap)
    (fused * g).sum().backward()
    # Ours: this rank's tokens and this rank's rows of the head; each rank's loss carries the factor N.
    N, rank = dist.get_world_size(), dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (N,))
    model = nn.Module()
    model.lm_head = nn.Linear(C, V, bias=False)
    model.lm_head.weight.data.copy_(w)
    split_head(model, mesh)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    hm = h[mine].to(dtype).requires_grad_()
    nll = model.head_loss(hm[None], model.lm_head, t[None, mine], softcap)[0]
    (nll * g[mine] * N).sum().backward()
    with torch.no_grad():  # the logits (generation): the split head gathers itself for them
        logits = model.lm_head(h[None, :3].to(dtype))[0].float()
        want = (h[:3].to(dtype) @ w.to(dtype).t()).float()
    dh = torch.cat([x for x in gather(hm.grad / N, world)])  # every rank's tokens, in order
    dw = model.lm_head.weight.grad.full_tensor()
    loss = torch.cat(gather(nll.detach(), world))
    return {"V": V, "dtype": str(dtype), "softcap": softcap, "counts": counts, "uniform": uniform,
            "logits_equal": bool(torch.equal(logits, want)),
            "ours": [rel(loss, ref.detach()), rel(dh, h64.grad), rel(dw, w64.grad)],
            "fused": [rel(fused.detach(), ref.detach()), rel(hf.grad, h64.grad), rel(wf.grad, w64.grad)]}


world, device = init_world("cpu")
rows = [case(1001, 64, [37, 29], dtype, None, uniform)  # uneven vocabulary and token counts
        for dtype in (torch.float32, torch.bfloat16) for uniform in (True, False)]
rows += [case(1000, 48, [20, 0], torch.float32, 30.0, uniform)  # a rank with no tokens; Gemma 2's soft-cap
         for uniform in (True, False)]
rows += [case(1001, 64, [37, 29], torch.float32, None, uniform, chunk=7)  # several chunks per rank
         for uniform in (True, False)]
if world.is_main:
    for r in rows:
        print(json.dumps(r))
finish()
