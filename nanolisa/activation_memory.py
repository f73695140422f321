"""Activation memory that knows what trains: keep for backward only what the gradients that are wanted need.

Autograd saves, for every op, what its backward needs for the inputs that require a gradient. A frozen
block (LISA freezes all but gamma of them; LoRA freezes every base weight) still has to pass the gradient
of its output back to its input -- the embedding below it trains -- but needs no weight gradient. Three
places where model.py's plain ops keep more than that, each replaced here by an autograd Function whose
backward runs exactly the ops the plain backward runs (bit-identical results, tests/test_activation_memory.py):

  frozen Linear under autocast   F.linear casts the fp32 weight to bf16 and mm saves that copy for the input's
                                 gradient: 2 bytes per frozen weight, 12.6 GB for LISA at Llama-2-7B
                                 (bench/RESULTS.md, the planner's note 2). `FrozenLinear` saves the fp32
                                 weight itself (a parameter: no new memory) and casts it again in backward.
                                 In fp32 the plain path already saves nothing but the weight, so it is
                                 untouched.
  the gated MLP's activation     down(act(gate) * up): the plain ops keep gate (for act's backward), act(gate)
                                 and up (for the product's): 3 (B, T, H) tensors. `GatedAct` keeps gate and
                                 up and recomputes act(gate) in backward (one elementwise op): H floats per
                                 token fewer in every block, trained or frozen (H = 2.7 C in Llama). The
                                 recomputation costs one pass over H values per token against matmuls of
                                 ~C x H, so its share of a step shrinks as 1 / C: from width
                                 RECOMPUTE_MIN_WIDTH up. Below it the model is small enough that the memory
                                 does not matter and the time does (9% of a step at the 128-wide tiny preset).
  frozen blocks, checkpointed    opt-in (`checkpoint_frozen`, train.py --checkpoint-frozen): a block with no
                                 trainable parameter keeps only its input and runs its forward again in
                                 backward (torch.utils.checkpoint), C floats per token instead of ~5C + 2H.
                                 It costs one forward of every frozen block: a frozen block's backward is one
                                 matmul per Linear (no weight gradient), so LISA's step goes from about
                                 2 + gamma/L block-forwards' worth of matmuls per block to 3, the cost of full
                                 fine-tuning -- memory bought with LISA's speed, hence a flag, not a default.

`lean(model)` applies them to a finished model, as kernels/ and parallel.py do: it swaps the classes of the
blocks' Linear, MLP and block modules for subclasses here (state-dict keys, parameters and hooks unchanged),
so model.py stays the plain reference the tests compare against. Call it before FSDP2 wraps the blocks and
before LoRA (LoRALinear routes its frozen base through the same FrozenLinear).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from nanolisa.activations import ACTIVATIONS, gelu_tanh

Tensor = torch.Tensor


class FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W in autocast's dtype; saves the fp32 W (a parameter), not its copy.

    x arrives already cast (the cast outside stays on the tape, as autocast's own). Forward and backward
    run the ops F.linear's autocast path runs: addmm/mm against W cast to x's dtype, and for the input's
    gradient grad @ W_cast, the same mm."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # x (..., in) -> (..., out)
        ctx.save_for_backward(weight)
        ctx.dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        w = weight.to(ctx.dtype)  # (out, in), recast: the bf16 copy lives only during this mm
        grad_x = grad.reshape(-1, grad.shape[-1]).mm(w).view(*grad.shape[:-1], w.shape[1])
        return grad_x, None, None


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear, through FrozenLinear where that saves memory: a frozen weight (and bias) in fp32 under an
    autocast that computes in another dtype, and an input that needs a gradient."""
    device = x.device.type
    if (weight.requires_grad or (bias is not None and bias.requires_grad) or not torch.is_grad_enabled()
            or not x.requires_grad or not torch.is_autocast_enabled(device)):
        return F.linear(x, weight, bias)
    dtype = torch.get_autocast_dtype(device)
    if weight.dtype == dtype or not weight.is_floating_point():
        return F.linear(x, weight, bias)
    return FrozenLinear.apply(x.to(dtype), weight, bias)


class LeanLinear(nn.Linear):
    """nn.Linear whose frozen weight is not copied for backward under autocast (FrozenLinear)."""

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.weight, self.bias)


# Activations whose derivative torch has as one kernel: act's backward is that kernel, as in the plain path.
_BACKWARD = {F.silu: torch.ops.aten.silu_backward,
             gelu_tanh: lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh")}


class GatedAct(torch.autograd.Function):
    """act(gate) * up, saving gate and up only; act(gate) is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, act) -> Tensor:  # 2 x (B, T, H) -> (B, T, H)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        a = ctx.act(gate)  # (B, T, H), as in forward
        grad_gate = _BACKWARD[ctx.act](grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * a if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


class _Recompute:
    """What is stored for backward in place of a saved view of h = act(gate) * up: gate and up (as the hooks
    around packed them) and the view's geometry."""

    def __init__(self, gate, up, view: tuple):
        self.gate, self.up, self.view = gate, up, view


def recompute_hooks(h: Tensor, gate: Tensor, up: Tensor, act) -> saved_tensors_hooks:
    """Hooks under which any saved view of h (down_proj's input, kept for its weight gradient, or a LoRA
    adapter's) is stored as gate and up -- which GatedAct keeps anyway -- and h recomputed when backward
    needs it, by the ops that made it (the same bits). Every other saved tensor, and gate and up themselves,
    go to the hooks that were active around these (activation checkpointing, a memory count), if any."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # only the innermost hooks run
    pack_outer, unpack_outer = outer or (lambda t: t, lambda t: t)
    # Weak references: autograd keeps these hooks with every tensor they packed until backward, and h must
    # not be kept alive through them. gate, h and up are alive while pack runs (down_proj's forward).
    h_ref, gate_ref, up_ref = weakref.ref(h), weakref.ref(gate), weakref.ref(up)

    def pack(t: Tensor):
        h = h_ref()
        if h is not None and (t is h or t._base is h):  # h, or the (B*T, H) view that linear's mm saves
            return _Recompute(pack_outer(gate_ref()), pack_outer(up_ref()), (t.size(), t.stride(), t.storage_offset()))
        return pack_outer(t)

    def unpack(x):
        if isinstance(x, _Recompute):
            with torch.no_grad():
                h = act(unpack_outer(x.gate)) * unpack_outer(x.up)  # (B, T, H), as in GatedAct's forward
            return h.as_strided(*x.view)
        return unpack_outer(x)

    return saved_tensors_hooks(pack, unpack)


class LeanMLP(nn.Module):
    """model.MLP's forward with the product act(gate) * up through GatedAct, and down_proj's saved input
    recomputed from gate and up (recompute_hooks): a trained down_proj (or its LoRA adapter) no longer keeps
    h, H floats per token. The class of every MLP whose activation has a kernel in _BACKWARD is swapped to a
    subclass of its own class and this. Under torch.compile the hooks are left out: inductor's partitioner
    chooses what to recompute itself."""

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)  # 2 x (B, T, H)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            h = GatedAct.apply(gate, up, self.act_fn)  # (B, T, H)
            if torch.compiler.is_compiling():
                return self.down_proj(h)
            with recompute_hooks(h, gate, up, self.act_fn):
                return self.down_proj(h)
        return self.down_proj(self.act_fn(gate) * up)


class LeanBlock(nn.Module):
    """A block that, when `checkpoint_frozen` is set and it has no trainable parameter, keeps only its input
    for backward and recomputes its forward there. Mixed into the block's own class."""

    checkpoint_frozen: bool = False

    def forward(self, x, rope, mask, kv_cache, layer):  # x (B, T, C) -> (B, T, C)
        run = super().forward
        if (self.checkpoint_frozen and kv_cache is None and self.training and torch.is_grad_enabled()
                and x.requires_grad and not any(p.requires_grad for p in self.parameters())):
            return checkpoint(run, x, rope, mask, kv_cache, layer, use_reentrant=False)
        return run(x, rope, mask, kv_cache, layer)


_mixed: dict[tuple[type, type], type] = {}


def _mix(module: nn.Module, lean: type) -> None:
    """Swap module's class for `lean` mixed into it (once per pair of classes, so pickling and FSDP2's own
    class swap see one stable class)."""
    cls = type(module)
    if issubclass(cls, lean):
        return
    key = (lean, cls)
    if key not in _mixed:
        _mixed[key] = type(f"Lean{cls.__name__}", (lean, cls), {"__module__": __name__})
    module.__class__ = _mixed[key]


# The narrowest model (hidden size) whose gated MLPs recompute act(gate) rather than keep it (GatedAct).
RECOMPUTE_MIN_WIDTH = 512


def lean(model: nn.Module, checkpoint_frozen: bool = False, min_width: int = RECOMPUTE_MIN_WIDTH) -> nn.Module:
    """Make the blocks of a built model keep less for backward (see the module docstring), in place.

    Idempotent; `checkpoint_frozen` can be changed by calling it again. GatedAct only from a hidden size of
    `min_width`. Returns the model."""
    from nanolisa.model import MLP
    recompute = model.config.hidden_size >= min_width
    for block in model.blocks:
        _mix(block, LeanBlock)
        block.checkpoint_frozen = checkpoint_frozen
        for m in block.modules():
            if type(m) is nn.Linear:
                m.__class__ = LeanLinear
            elif recompute and isinstance(m, MLP) and m.act_fn in _BACKWARD and not isinstance(m, LeanMLP):
                _mix(m, LeanMLP)
    return model


assert set(_BACKWARD) <= set(ACTIVATIONS.values())
