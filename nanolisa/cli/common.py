"""What every command-line tool shares: the argument parser, the error handling, the runtime flags and
loading a model for inference.

A bad flag, a missing file or any other `UserError` ends a tool with one line on stderr (`error: ...`)
and exit status 2, never a traceback or a usage dump; Ctrl-C ends it with status 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from nanolisa.config import DTYPES, to_dtype
from nanolisa.errors import UserError
from nanolisa.kernels import CHOICES as KERNELS
from nanolisa.kernels import use_kernels
from nanolisa.lora import load_adapter, read_adapter_config
from nanolisa.pretrained import load_pretrained
from nanolisa.runtime import default_dtype, pick_device


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit status 2 (through run_cli), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point; turn a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def add_runtime_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    """--dtype, --device, --kernels and --threads, the same for every tool (nanolisa/runtime.py applies them)."""
    dtype_help = ("mixed precision: the forward pass runs in this dtype (autocast) while the weights and "
                  "AdamW state stay fp32" if training else "dtype of the weights")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help=f"{dtype_help} (default: bf16 on a GPU that supports it, else fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--kernels", default="auto", choices=list(KERNELS), help="auto: Triton kernels on a CUDA "
                   "GPU when triton is installed, else PyTorch; the training loss never builds the full logits "
                   "either way (see kernels/) (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice). On a busy machine --threads 1 can be "
                        "much faster: small matmuls wait on the slowest thread")


def load_for_inference(model_path: str, lora: str | None = None, dtype: str | None = None,
                       device: str | None = None, kernels: str = "auto"):
    """(model, tokenizer) in eval mode, for chat and eval: a Hugging Face directory or a preset name,
    optionally with a LoRA adapter directory on top (a bare adapter directory as model_path loads the base
    model its adapter_config.json names). dtype None: bf16 on a GPU that supports it, else fp32."""
    dev = pick_device(device)
    if lora is None and os.path.isfile(os.path.join(model_path, "adapter_config.json")) and \
            not os.path.isfile(os.path.join(model_path, "config.json")):
        # `train.py --method lora` writes an adapter directory: load its base model, then the adapter
        base = read_adapter_config(model_path).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{model_path}: a LoRA adapter without base_model_name_or_path; give the base "
                            f"model with --model and the adapter with --lora")
        model_path, lora = base, model_path
    dtype = to_dtype(dtype or default_dtype(dev))
    model, tokenizer = load_pretrained(model_path, dtype=dtype, device=dev)
    if lora is not None:
        if not os.path.isdir(lora):
            raise UserError(f"--lora {lora}: no such adapter directory")
        load_adapter(model, lora)
        model.to(device=dev, dtype=dtype)
    use_kernels(model, kernels)
    return model.eval(), tokenizer
