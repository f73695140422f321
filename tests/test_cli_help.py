"""Every flag of every command-line tool explains itself in --help, and each script starts with a usage
docstring."""
import argparse
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", ["train.py", "chat.py", "eval.py", "nanolisa/merge_lora.py"])
def test_every_flag_has_help(path, monkeypatch):
    mod = load(path)
    assert mod.__doc__ and "python" in mod.__doc__, f"{path} has no usage docstring"
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
        assert a.help and len(a.help) > 10, f"{path}: {a.option_strings} has no help"
