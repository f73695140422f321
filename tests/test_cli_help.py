"""Every flag of every command-line tool explains itself in --help, and each script starts with a usage
docstring."""
import argparse
import ast
import importlib
import os

import pytest

from tests.helpers import ROOT


@pytest.mark.parametrize("script", ["train.py", "chat.py", "eval.py"])
def test_scripts_are_thin_and_have_a_usage_docstring(script):
    source = open(os.path.join(ROOT, script)).read()
    doc = ast.get_docstring(ast.parse(source))
    assert doc and f"python {script}" in doc, f"{script} has no usage docstring"
    assert f"from nanolisa.cli.{script[:-3]} import run" in source


@pytest.mark.parametrize("tool", ["train", "chat", "eval", "merge", "preset"])
def test_every_flag_has_help(tool, monkeypatch):
    mod = importlib.import_module(f"nanolisa.cli.{tool}")
    assert mod.__doc__ and "nanolisa" in mod.__doc__ and "python" in mod.__doc__, f"{tool} has no usage docstring"
    seen = []

    def capture(self, argv=None, namespace=None):
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        mod.parse_args([])
    flags = [a for a in seen[0]._actions if a.option_strings and a.dest != "help"]
    assert flags
    for a in flags:
        assert a.help and len(a.help) > 10, f"{tool}: {a.option_strings} has no help"
