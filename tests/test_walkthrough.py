"""docs/walkthrough.md stays true as the code moves: every file and function it names exists, every command
it gives runs, every stop of docs/walkthrough.py is shown by a command, and the dry-run figures it quotes
for Llama-2-7B are what the planner prints now (the rows set by the parameter counts alone).

Names are written in the walkthrough as `path.py:Name` or `path.py:Class.method`; commands are the lines of
its ```bash blocks. The commands run as a reader runs them, from the checkout's root, with this Python.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import ROOT

DOC = os.path.join(ROOT, "docs", "walkthrough.md")
NAME = re.compile(r"`([\w/.-]+\.py)(?::([\w.]+))?`")  # `nanolisa/lisa.py:LISA.maybe_switch`
PLANNED = ("weights", "gradients", "optimizer")  # the dry-run rows that only the parameter counts decide


def doc() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


@functools.cache
def defined(path: str) -> set[str]:
    """The top-level functions and classes of a Python file, and Class.method for their methods."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def fenced() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the walkthrough, in order."""
    blocks, lang, lines = [], None, []
    for line in doc().splitlines():
        if line.startswith("```") and lang is None:
            lang, lines = line[3:].strip(), []
        elif line.startswith("```"):
            blocks.append((lang, "\n".join(lines)))
            lang = None
        elif lang is not None:
            lines.append(line)
    assert lang is None, "docs/walkthrough.md has an unclosed ``` block"
    return blocks


def commands() -> list[str]:
    """The command lines of the walkthrough's ```bash blocks."""
    return [line.strip() for lang, text in fenced() if lang == "bash" for line in text.splitlines() if line.strip()]


def test_every_file_and_function_named_exists():
    names = NAME.findall(doc())
    assert len(names) >= 40, names  # the walkthrough names its places this way; a format change must show
    missing = [f"{path}:{name}" if name else path for path, name in names
               if not os.path.isfile(os.path.join(ROOT, path)) or (name and name not in defined(path))]
    assert not missing, f"docs/walkthrough.md names what does not exist: {missing}"


def test_every_stop_has_a_command():
    from docs.walkthrough import STOPS
    shown = [c.split()[2] for c in commands() if c.startswith("python docs/walkthrough.py ")]
    assert sorted(shown) == sorted(STOPS), (shown, list(STOPS))
    assert all(c.startswith("python ") for c in commands())


def run(command: str, tmp_path) -> str:
    """Run a walkthrough command as written (`python` meaning this Python; the trainer's --out in tmp_path)."""
    argv = shlex.split(command.replace("/tmp/walkthrough-out", str(tmp_path / "out")), comments=True)
    p = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (command, p.stdout[-2000:], p.stderr[-2000:])
    return p.stdout + p.stderr


def test_the_stops_run(tmp_path):
    """Every `python docs/walkthrough.py STOP` of the page, in one process (one torch import)."""
    stops = [c.split()[2] for c in commands() if c.startswith("python docs/walkthrough.py ")]
    out = run("python docs/walkthrough.py " + " ".join(stops), tmp_path)
    assert [line.split(":")[0][3:] for line in out.splitlines() if line.startswith("== ")] == stops
    # What the page says the stops show.
    assert "q.k = " in out and len(set(re.findall(r"distance 3\): q\.k = (\S+)", out))) == 1  # RoPE: distance only
    assert "max |ours - torch's| = 0.0e+00" in out  # AdamW: torch's bits
    assert "max |logits after - before| at initialisation: 0.0e+00" in out  # LoRA: B = 0
    # LISA: the optimizer's state stays at the active block's worth across switches, a fraction of full's.
    *lisa, full = [int(n) for n in re.findall(r"AdamW state for (\d+) tensors", out)]
    assert len(lisa) == 6 and len(set(lisa)) == 1 and lisa[0] < full / 2, out
    assert len(set(re.findall(r"active blocks (\[\d+\])", out))) > 1, out  # and it did switch


@pytest.mark.parametrize("command", [c for c in commands() if not c.startswith("python docs/walkthrough.py ")])
def test_the_other_commands_run(command, tmp_path):
    out = run(command, tmp_path)
    if "--dry-run" in command:
        quoted = [text for lang, text in fenced() if not lang and text.startswith("--dry-run:")]
        block = next((b for b in quoted if b.splitlines()[0] == out.splitlines()[0]), None)
        assert block is not None, f"docs/walkthrough.md does not quote the output of: {command}\n{out}"
        for row in PLANNED:  # each row's largest bytes: the parameter counts decide them
            largest = rf"^{row}\s+(?:-|\S+ GiB)\s+(\S+ GiB)"
            ours, quoted = re.search(largest, out, re.M), re.search(largest, block, re.M)
            assert ours and quoted and quoted.group(1) == ours.group(1), (row, block, out)
