"""nanolisa.kernels: faster kernels, swapped into a model after it is built.

nanolisa/model.py stays the plain PyTorch reference; every kernel here is tested against it
(tests/test_kernels.py) and plugged in from outside, as gpt-fast's tp.py transforms a finished model:

    model, tokenizer = nanolisa.load_pretrained("path/to/llama")
    chosen = use_kernels(model, "auto")   # "triton" on a CUDA GPU with triton installed, else "torch"

| kernel                  | file                                   | replaces                                        |
|-------------------------|----------------------------------------|-------------------------------------------------|
| flash attention         | flash_attention.py (Triton)            | `sdpa_attention`, through `model.set_attention` |
| RMSNorm                 | rmsnorm.py (Triton)                    | model.py's `RMSNorm` modules                    |
| linear + cross-entropy  | linear_cross_entropy.py (PyTorch),     | the model's `head_loss` (nanolisa/loss.py's     |
|                         | triton_linear_cross_entropy.py (Triton)| head_nll): chunked, the logits never exist      |

`use_kernels(model, "torch")` keeps PyTorch's attention and RMSNorm and uses the chunked PyTorch
linear + cross-entropy; "triton" uses all three Triton kernels. On a machine without a GPU, "triton" runs
the kernels in Triton's interpreter when TRITON_INTERPRET=1 is set (slow: for tests) and is an error
otherwise. Triton is imported only when "triton" is chosen, so this package imports without it.

Installed as `nanolisa.kernels` (pyproject.toml maps the top-level kernels/ folder there), never as a
top-level `kernels` package, which would collide with the unrelated `kernels` distribution on PyPI.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from nanolisa.errors import UserError

CHOICES = ("auto", "triton", "torch")
_noticed: set[str] = set()


def notice_once(message: str) -> None:
    """Print `note: message` to stderr the first time it comes up in this process."""
    if message not in _noticed:
        _noticed.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(kernels: str, device: torch.device) -> str:
    """--kernels auto|triton|torch for a model on `device` -> "triton" or "torch" (or a one-line UserError)."""
    if kernels not in CHOICES:
        raise UserError(f"unknown --kernels {kernels!r}: choose one of {', '.join(CHOICES)}")
    if kernels == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if kernels == "triton":
        if not triton_installed():
            raise UserError("--kernels triton: triton is not installed; pip install triton "
                            "(or nanolisa[kernels]), or use --kernels torch")
        if device.type != "cuda" and not interpreting():
            raise UserError(f"--kernels triton needs a CUDA GPU (the model is on {device.type}); set "
                            f"TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter (slow), "
                            f"or use --kernels torch")
    return kernels


def use_kernels(model: torch.nn.Module, kernels: str = "auto") -> str:
    """Swap kernels into a built nanolisa model, in place; return what was chosen, "triton" or "torch".

    Call it once the model is on its device, before or after LoRA / LISA set-up (parameters are shared,
    never copied). Calling it again switches back and forth."""
    from nanolisa.kernels.linear_cross_entropy import TORCH_ROWS, HeadLoss
    from nanolisa.model import RMSNorm, sdpa_attention

    chosen = resolve(kernels, model.lm_head.weight.device)
    if chosen == "triton":
        from nanolisa.kernels.flash_attention import flash_attention
        from nanolisa.kernels.rmsnorm import TritonRMSNorm
        from nanolisa.kernels.triton_linear_cross_entropy import TRITON_ROWS
        model.set_attention(flash_attention)
        _swap_rmsnorm(model, TritonRMSNorm)
        model.head_loss = HeadLoss(TRITON_ROWS)
    else:
        model.set_attention(sdpa_attention)
        _swap_rmsnorm(model, RMSNorm)
        model.head_loss = HeadLoss(TORCH_ROWS)
    return chosen


def _swap_rmsnorm(model: torch.nn.Module, cls: type) -> None:
    """Make every RMSNorm of the model a `cls` (RMSNorm or a subclass) that shares its weight Parameter."""
    from nanolisa.model import RMSNorm
    for name, m in list(model.named_modules()):
        if isinstance(m, RMSNorm) and type(m) is not cls:
            with torch.device("meta"):  # allocate nothing: the weight Parameter moves over
                new = cls(m.weight.numel(), m.eps)
            new.weight = m.weight
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
