"""Errors a user can cause, and how the command-line tools report them.

Anything the user controls (a flag, a model directory, a data file) is checked at the edge and raises
`UserError` with one line that says what is wrong and how to fix it. The CLIs wrap their `main` in
`run_cli`, which prints that line to stderr and exits with status 2, with no traceback. Bugs in nanolisa
itself still raise ordinary exceptions with a full traceback, so they get reported and fixed.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, NoReturn


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def read_json(path: str) -> Any:
    """A JSON file that came from the user (a config, an adapter, a tokenizer file): unreadable or invalid
    JSON is a UserError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable as JSON ({e})") from None


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit status 2 (through run_cli), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see --help)")
