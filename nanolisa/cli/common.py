"""What every command-line tool shares: the argument parser, the error handling, the runtime flags and
loading a model for inference.

A bad flag, a missing file or any other `UserError` ends a tool with one line on stderr (`error: ...`)
and exit status 2, never a traceback or a usage dump; so does an output pipe that closes early
(`chat.py ... | head -1`); Ctrl-C ends it with status 130. Every tool answers `--version`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

import torch

import nanolisa
from nanolisa.config import DTYPES, to_dtype
from nanolisa.errors import UserError
from nanolisa.kernels import CHOICES as KERNELS
from nanolisa.kernels import use_kernels
from nanolisa.lora import ADAPTER_CONFIG, load_adapter, read_adapter_config
from nanolisa.presets import PRESETS
from nanolisa.pretrained import load_pretrained
from nanolisa.runtime import default_dtype, pick_device
from nanolisa.templates import PRESETS as TEMPLATE_PRESETS
from nanolisa.templates import resolve_template
from nanolisa.tokenizer import load_tokenizer


def version() -> str:
    return f"nanolisa {nanolisa.__version__} (torch {torch.__version__})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit status 2 (through run_cli), not a usage dump; and
    --version on every tool."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.add_argument("--version", action="version", version=version(),
                          help="print nanolisa's and torch's versions and exit")

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point; turn a UserError into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        # whoever read stdout stopped (`| head -1`): say so once, and point stdout at /dev/null so that
        # Python's final flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("error: the output was closed before everything was written (a pipe reader that exited?)",
              file=sys.stderr)
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
    loss = ("; the training loss never builds the full logits either way (the LM head and cross-entropy run "
            "chunk by chunk)" if training else "")
    p.add_argument("--kernels", default="auto", choices=list(KERNELS),
                   help="attention and RMSNorm kernels. auto: Triton's on a CUDA GPU when triton is installed, "
                        f"else PyTorch's; triton: Triton's (on a CPU only under TRITON_INTERPRET=1, slow); torch: "
                        f"PyTorch's{loss} (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice). On a busy machine --threads 1 can be "
                        "much faster: small matmuls wait on the slowest thread")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --lora and --base, the same for chat.py and eval.py."""
    p.add_argument("--model", default="tiny",
                   help="Hugging Face model directory, a LoRA adapter directory (train.py --method lora writes "
                        "one), or a preset name (default: %(default)s)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="LoRA adapter directory to apply on top of --model (then --model is the base)")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="base model of a LoRA adapter given as --model (default: base_model_name_or_path in "
                        "its adapter_config.json, which train.py records as an absolute path)")


# ----------------------------------------------------------------------------------------------------------
# Loading a model for chat and eval


def has_tokenizer_files(d: str) -> bool:
    return any(os.path.isfile(os.path.join(d, f)) for f in ("tokenizer.json", "tokenizer.model"))


def adapter_base(adapter: str, base: str | None) -> str:
    """The base model of a bare adapter directory: --base, else the one its adapter_config.json names,
    which must exist here (a relative path is read from the current directory, as peft reads it)."""
    if base is not None:
        if not os.path.isdir(base) and base not in PRESETS:
            raise UserError(f"--base {base}: no such model directory (or preset: {', '.join(PRESETS)})")
        return base
    recorded = read_adapter_config(adapter).get("base_model_name_or_path")
    where = os.path.join(adapter, ADAPTER_CONFIG)
    if not recorded:
        raise UserError(f"{adapter} is a LoRA adapter and {where} names no base model "
                        f"(base_model_name_or_path); give the base with --base DIR")
    if not os.path.isdir(recorded) and recorded not in PRESETS:
        relative = "" if os.path.isabs(recorded) else f", read from the current directory {os.getcwd()}"
        raise UserError(f"the base model {recorded!r} that {where} names (base_model_name_or_path{relative}) "
                        f"is not a model directory here; give the base with --base DIR")
    print(f"note: {adapter} is a LoRA adapter on {recorded} (base_model_name_or_path in {where}; "
          f"--base overrides it)", file=sys.stderr)
    return recorded


def load_for_inference(model_path: str, lora: str | None = None, base: str | None = None,
                       dtype: str | None = None, device: str | None = None, kernels: str = "auto"):
    """(model, tokenizer, tokenizer_dir) in eval mode, for chat and eval: a Hugging Face directory or a preset
    name, optionally with a LoRA adapter directory on top. A bare adapter directory as model_path loads the
    base model `adapter_base` finds. The tokenizer, and with it the chat template, is the adapter's own when
    the adapter directory has tokenizer files (train.py writes the template it trained with there, and
    peft, transformers and merge read it from there); tokenizer_dir says where it came from. dtype None:
    bf16 on a GPU that supports it, else fp32."""
    dev = pick_device(device)
    if lora is None and os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG)) and \
            not os.path.isfile(os.path.join(model_path, "config.json")):
        model_path, lora = adapter_base(model_path, base), model_path
    elif base is not None:
        raise UserError(f"--base is for a LoRA adapter directory given as --model, and {model_path} is not one"
                        + (" (with --lora, --model is the base)" if lora else ""))
    dtype = to_dtype(dtype or default_dtype(dev))
    model, tokenizer = load_pretrained(model_path, dtype=dtype, device=dev)
    tokenizer_dir = model_path
    if lora is not None:
        if not os.path.isdir(lora):
            raise UserError(f"--lora {lora}: no such adapter directory")
        load_adapter(model, lora)
        model.to(device=dev, dtype=dtype)
        if has_tokenizer_files(lora):
            tokenizer, tokenizer_dir = load_tokenizer(lora), lora
    use_kernels(model, kernels)
    return model.eval(), tokenizer, tokenizer_dir


def describe_template(tokenizer, template: str | None, tokenizer_dir: str) -> str:
    """Which chat template is in use, for a `note:` line: the --template given, or the tokenizer's own
    (named after the preset it equals, if any), or none."""
    if template is not None:
        name, _ = resolve_template(tokenizer, template)
        if template in TEMPLATE_PRESETS:
            return f"the {name} preset (--template)"
        return "the Jinja template given with --template" if name == "custom" else f"{template} (--template)"
    own = tokenizer.chat_template
    if not own:
        return f"none ({tokenizer_dir} has no chat template)"
    same = next((n for n, src in TEMPLATE_PRESETS.items() if src == own), None)
    return f"{tokenizer_dir}'s own" + (f" (the {same} preset)" if same else "")
