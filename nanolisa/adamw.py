"""AdamW, written out: Adam (Kingma & Ba, 2015) with decoupled weight decay (Loshchilov & Hutter, 2019).

A drop-in for `torch.optim.AdamW` (no amsgrad / maximize / fused / capturable), computed with the same
multi-tensor `torch._foreach_*` ops in the same order as torch's `foreach=True` path, so the two agree to
floating-point rounding (tests/test_adamw.py checks this over hundreds of steps). The per-parameter state
has torch's layout -- `step` (a float32 CPU scalar tensor), `exp_avg`, `exp_avg_sq` -- so the inherited
`state_dict()` / `load_state_dict()` round-trip and a resumed run is bit-exact.

For one parameter p with gradient g at step t (lr = learning rate, wd = weight decay):

    p   <- p * (1 - lr * wd)                       decoupled weight decay   (L&H Alg. 2, line 12)
    m   <- b1 * m + (1 - b1) * g                   first moment             (K&B Alg. 1)
    v   <- b2 * v + (1 - b2) * g^2                 second moment            (K&B Alg. 1)
    p   <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)           (K&B Sec. 2, eps placement as torch)

What LISA (nanolisa/lisa.py) relies on -- the memory rules:
  * State (m, v: two extra copies of the parameter) is allocated lazily, only for a parameter that has
    requires_grad=True AND a .grad at step time. So the optimizer can be built over ALL model parameters:
    frozen ones cost nothing, and a layer unfrozen later is picked up automatically (the bug in LMFlow
    issue 726 was an optimizer built only from the parameters trainable at start-up).
  * At every step() the state of any parameter in the groups whose requires_grad is now False is freed,
    and `release(params)` frees it explicitly (LISA calls it right at each layer switch). Without this,
    state of every layer ever sampled accumulates until memory equals full fine-tuning (LMFlow 729, 768).
  * A parameter that re-joins later starts with FRESH state (step 0, m = v = 0), exactly as if a new
    optimizer had been created for the newly sampled layers. This is deliberate: its old moments are
    stale (the other layers moved meanwhile), and keeping them is precisely the memory LISA saves.

Sharded parameters (FSDP2, nanolisa/parallel.py): a parameter, its gradient and its state m, v are DTensors
holding one shard per rank. The update is elementwise, so each rank runs it on its local shards only
(nanolisa/parallel.py `local`): no communication, and the temporaries are sized by the shard, not the whole
tensor. The local shard shares memory with the DTensor, so updating it in place updates the parameter (and
m, v). Working on the DTensor instead would be wrong as well as slow: a view such as `split` along the
sharded dimension redistributes it into a replicated temporary, and an update written there is lost.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch

from nanolisa.parallel import local


class AdamW(torch.optim.Optimizer):
    # When set, each tensor takes its step through this function instead of the foreach path below:
    # kernels/compile.py `compile_adamw` (train.py --compile) sets it to torch.compile(update_tensor_).
    update_tensor: Callable | None = None

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"Invalid eps / weight_decay: {eps} / {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def release(self, params: Iterable[torch.Tensor]) -> None:
        """Free the optimizer state (m, v, step) of `params`; they start fresh if they train again."""
        for p in params:
            self.state.pop(p, None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            # Frozen parameters drop their state (see the module docstring: this is LISA's memory saving).
            self.release(p for p in group["params"] if not p.requires_grad)
            # Gather the parameters that take a step now, grouped by (device, dtype): each foreach call
            # below launches one fused kernel per group instead of one kernel per tensor.
            buckets: dict[tuple, list[list[torch.Tensor]]] = defaultdict(lambda: [[], [], [], [], []])
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:  # lazy init: t = 0, m_0 = 0, v_0 = 0  (K&B Alg. 1)
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)  # on CPU, as torch does
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                b = buckets[(p.device, p.dtype)]
                tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
                for lst, t in zip(b, (*map(local, tensors), state["step"])):
                    lst.append(t)

            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for params, grads, exp_avgs, exp_avg_sqs, steps in buckets.values():
                if self.update_tensor is None:
                    self._update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps)
                else:
                    self._update_each(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps)
        return loss

    def _update_each(self, params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps) -> None:
        """The same step one tensor at a time, through self.update_tensor (see update_tensor_)."""
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)       # t <- t + 1
        scalars: dict[float, torch.Tensor] = {}  # by t: LISA's blocks joined at different steps
        for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, (s.item() for s in steps)):
            if p.numel() == 0:  # an FSDP2 rank's empty shard of a small tensor
                continue
            if t not in scalars:  # one small tensor: new values each step, not a new compilation
                scalars[t] = torch.tensor([1 - lr * wd, -lr / (1 - beta1 ** t), (1 - beta2 ** t) ** 0.5],
                                          device=p.device)
            p, g, m, v = (x.view(-1) if x.is_contiguous() else x for x in (p, g, m, v))  # one graph for all sizes
            self.update_tensor(p, g, m, v, scalars[t], beta1, beta2, eps)

    @staticmethod
    def _update(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, wd, eps) -> None:
        """One AdamW step for a list of same-device, same-dtype tensors (torch's foreach op order)."""
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)       # t <- t + 1
        if wd != 0:
            torch._foreach_mul_(params, 1 - lr * wd)                   # p <- p * (1 - lr*wd)   (L&H: decoupled)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)               # m <- b1*m + (1-b1)*g   (K&B)
        torch._foreach_mul_(exp_avg_sqs, beta2)                        # v <- b2*v ...
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)  #     ... + (1-b2)*g^2   (K&B)
        ts = [s.item() for s in steps]                                 # t as Python floats (steps live on CPU)
        step_size = [(lr / (1 - beta1 ** t)) * -1 for t in ts]         # -lr / (1 - b1^t)   bias correction of m
        bc2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in ts]               # sqrt(1 - b2^t)     bias correction of v
        # The denominator needs a temporary as large as the parameters: made TEMP_ELEMENTS at a time, so the
        # step's extra memory stays bounded however large a trainable tensor is (a 128k-vocabulary embedding
        # and head that LISA always trains are 2 x 262 MB at width 512). Elementwise, so slicing changes no bit.
        # On a GPU each slice is 4 kernel launches, so slices are larger there (TEMP_ELEMENTS_BY_DEVICE).
        n = temp_elements(params[0].device)
        for params, exp_avgs, exp_avg_sqs, step_size, bc2_sqrt in _slices(params, exp_avgs, exp_avg_sqs,
                                                                         step_size, bc2_sqrt, n):
            denom = torch._foreach_sqrt(exp_avg_sqs)                   # sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)                       # sqrt(v / (1 - b2^t)) = sqrt(v_hat)
            torch._foreach_add_(denom, eps)                            # sqrt(v_hat) + eps
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)  # p <- p - lr/(1-b1^t) * m / denom


def update_tensor_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, scalars: torch.Tensor,
                   beta1: float, beta2: float, eps: float) -> None:
    """AdamW's step for one tensor, in place: the module docstring's four lines, one line each.

    scalars = (1 - lr*wd, -lr / (1 - b1^t), sqrt(1 - b2^t)), a tensor on p's device. Run eagerly it computes
    torch's bits exactly (the same operations in the same order as the foreach path), only slower. It is
    written for torch.compile (kernels/compile.py `compile_adamw`, train.py --compile): inductor fuses it into
    one loop that reads p, g, m and v once and writes p, m and v once, with no temporary at all, where the
    foreach path makes eight passes over memory (about 3x faster on a CPU; compiled, the bits move by float
    rounding: tests/test_adamw.py checks both against torch.optim.AdamW)."""
    decay, step_size, bc2_sqrt = scalars.unbind()
    p.mul_(decay)                                                  # p <- p * (1 - lr*wd)
    m.lerp_(g, 1 - beta1)                                          # m <- b1*m + (1-b1)*g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)                  # v <- b2*v + (1-b2)*g^2
    p.add_(step_size * m / (v.sqrt() / bc2_sqrt + eps))            # p <- p - lr/(1-b1^t) * m / (sqrt(v_hat) + eps)


TEMP_ELEMENTS = 2**22  # at most this many elements (16 MB in fp32) of the step's temporary at a time, on CPU
# By device type. On CPU, 16 MB slices cost nothing measurable (one foreach call per slice is a loop over its
# tensors) and keep the step's extra memory small. On CUDA every slice is 4 kernel launches, and at 16 MB
# a 7B full fine-tune would launch ~6,400 of them per step (6.7e9 / 2**22 x 4); 2**27 elements (512 MB of
# fp32, two slices at most: 1 GB, ~1% of an 80 GB GPU) makes that ~200. The bits are the same at any size.
TEMP_ELEMENTS_BY_DEVICE = {"cuda": 2**27}


def temp_elements(device: torch.device) -> int:
    """The slice size of AdamW's step temporary on `device` (elements)."""
    return TEMP_ELEMENTS_BY_DEVICE.get(device.type, TEMP_ELEMENTS)


def _slices(params, exp_avgs, exp_avg_sqs, step_size, bc2_sqrt, n: int | None = None):
    """The lists again, in groups of at most n (default TEMP_ELEMENTS) elements; a larger tensor is cut into
    flat views (views of the same memory: updating them updates the tensor)."""
    n = n or TEMP_ELEMENTS
    pieces = []
    for p, m, v, a, c in zip(params, exp_avgs, exp_avg_sqs, step_size, bc2_sqrt):
        if p.numel() > n and all(t.is_contiguous() for t in (p, m, v)):
            cuts = (t.view(-1).split(n) for t in (p, m, v))
            pieces += [(pp, mm, vv, a, c) for pp, mm, vv in zip(*cuts)]
        else:
            pieces.append((p, m, v, a, c))
    group, size = [], 0
    for piece in pieces:
        if group and size + piece[0].numel() > n:
            yield tuple(map(list, zip(*group)))
            group, size = [], 0
        group.append(piece)
        size += piece[0].numel()
    if group:
        yield tuple(map(list, zip(*group)))
