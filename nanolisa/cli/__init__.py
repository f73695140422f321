"""The command-line tools: `nanolisa train|chat|eval|merge|preset ...` (or `python -m nanolisa ...`).

Each tool is one module here (train.py, chat.py, eval.py, merge.py, preset.py) with `parse_args`, `main`
and `run`; the top-level train.py, chat.py and eval.py of a source checkout call the same `run`. common.py
holds what they share: the argument parser, one-line errors, --version, the runtime flags and loading a
model for inference.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "fine-tune a model (LISA, LoRA or full)", "chat": "talk to a model in the terminal",
            "eval": "NLL / perplexity, exact-match or multiple-choice accuracy",
            "merge": "merge a LoRA adapter into its base model",
            "preset": "write a built-in preset (tiny) to a directory as a Hugging Face model"}


def usage() -> str:
    lines = "\n".join(f"  {name:<6} {what}" for name, what in COMMANDS.items())
    return (f"usage: nanolisa COMMAND [flags]   (nanolisa COMMAND --help explains every flag; nanolisa --version)"
            f"\n\ncommands:\n{lines}")


def main(argv: list[str] | None = None) -> None:
    """`nanolisa COMMAND [flags]`: run one tool, as if it were started as its own script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if argv[:1] == ["--version"]:
        from nanolisa.cli.common import version  # imports torch: only when asked
        print(version())
        return
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"error: {'no command given' if not argv else f'unknown command {argv[0]!r}'}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"nanolisa {argv[0]}", *argv[1:]]  # argparse names the tool after argv[0]
    importlib.import_module(f"nanolisa.cli.{argv[0]}").run()
