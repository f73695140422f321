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
                            "(or pip install \".[kernels]\" in a nanolisa checkout), or use --kernels torch")
        if device.type != "cuda" and not interpreting():
            raise UserError(f"--kernels triton needs a CUDA GPU (the model is on {device.type}); set "
                            f"TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter (slow), "
                            f"or use --kernels torch")
    return kernels


def use_kernels(model: torch.nn.Module, kernels: str = "auto", dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> str:
    """Swap kernels into a built nanolisa model, in place; return what was chosen, "triton" or "torch".

    Call it before or after LoRA / LISA set-up (parameters are shared, never copied), but before FSDP2
    shards the model (it replaces modules). `device`: where the model runs (default: where its weights
    are; a model still on the meta device needs it). Calling it again switches back and forth. On a GPU
    each Triton kernel first passes the self-check (kernels/check.py) for the model's head size and
    `dtype` (the compute dtype: autocast's, or the weights'); one that fails to compile, launch or match
    PyTorch is left out with a one-line notice, and PyTorch's kernel does that work instead."""
    from nanolisa.kernels.linear_cross_entropy import TORCH_ROWS, HeadLoss
    from nanolisa.model import RMSNorm, sdpa_attention

    device = device or model.lm_head.weight.device
    chosen = resolve(kernels, device)
    works = _self_check(model, dtype or model.lm_head.weight.dtype, device) if chosen == "triton" else {}
    attention, norm, rows = sdpa_attention, RMSNorm, TORCH_ROWS
    if chosen == "triton":
        from nanolisa.kernels.flash_attention import flash_attention
        from nanolisa.kernels.rmsnorm import TritonRMSNorm
        from nanolisa.kernels.triton_linear_cross_entropy import TRITON_ROWS
        attention = flash_attention if works["attention"] else attention
        norm = TritonRMSNorm if works["rmsnorm"] else norm
        rows = TRITON_ROWS if works["loss"] else rows
    model.set_attention(attention)
    _swap_rmsnorm(model, norm)
    model.head_loss = HeadLoss(rows)
    return chosen


_checked: dict[tuple, bool] = {}  # (kernel, device, dtype, head size) -> passed, once per process
SELF_CHECK = torch.cuda.is_available()  # a GPU: check; Triton's interpreter (tests): test_kernels.py does


def _self_check(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> dict[str, bool]:
    """Which Triton kernels pass kernels/check.py on the model's GPU, for its head size and `dtype`. In
    Triton's interpreter (tests) they are not checked again here: tests/test_kernels.py checks them."""
    if not SELF_CHECK:
        return dict.fromkeys(("attention", "rmsnorm", "loss"), True)
    from nanolisa.kernels.check import TOLERANCE, check
    head_size = model.config.head_dim
    dtype = dtype if dtype in TOLERANCE else torch.float32
    works = {}
    for kernel in ("attention", "rmsnorm", "loss"):
        key = (kernel, device, dtype, head_size)
        if key not in _checked:
            ok, detail = check(kernel, device, dtype, head_size)
            _checked[key] = ok
            if not ok:
                notice_once(f"the Triton {kernel} kernel failed its self-check on this GPU ({detail}): using "
                            f"PyTorch's instead (python -m nanolisa.kernels.check shows every kernel)")
        works[kernel] = _checked[key]
    return works


def _swap_rmsnorm(model: torch.nn.Module, cls: type) -> None:
    """Make every RMSNorm of the model a `cls` (RMSNorm or a subclass) that shares its weight Parameter."""
    from nanolisa.model import RMSNorm
    for name, m in list(model.named_modules()):
        if isinstance(m, RMSNorm) and type(m) is not cls:
            with torch.device("meta"):  # allocate nothing: the weight Parameter moves over
                new = cls(m.weight.numel(), m.eps, m.offset, m.weight_fp32)
            new.weight = m.weight
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
