"""nanolisa as pip installs it: the `nanolisa` console script and `python -m nanolisa` run every tool, and
the wheel holds the CLI package, the tiny preset's files and the MIT LICENSE, built without setuptools
warnings, with the version nanolisa.__version__ says."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

TOOLS = ["train", "chat", "eval", "merge", "preset"]


def installed_script() -> str:
    try:
        dist = importlib.metadata.distribution("nanolisa")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nanolisa is not pip-installed here (make test installs it): no console script to run")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"nanolisa": "nanolisa.cli:main"}
    script = shutil.which("nanolisa", path=os.path.dirname(sys.executable))
    assert script, "the package is installed but its nanolisa console script is not beside this python"
    return script


def test_installed_commands_run_help():
    """Every tool's --help through the console script, and one through `python -m nanolisa` (each run
    imports torch: a few seconds)."""
    script = installed_script()
    runs = [[script, "--help"]] + [[script, tool, "--help"] for tool in TOOLS] + \
        [[sys.executable, "-m", "nanolisa", "train", "--help"]]
    for cmd in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")  # not the source checkout
        assert r.returncode == 0, (cmd, r.stderr)
        tool = cmd[-2] if len(cmd) > 2 and cmd[-2] in TOOLS else None
        assert r.stdout.startswith(f"usage: nanolisa {tool}") if tool else "nanolisa COMMAND" in r.stdout, r.stdout


def test_wheel_has_the_cli_and_the_tiny_preset_and_builds_without_warnings(tmp_path):
    """Built from the tracked files (as a release would be) with setuptools' own backend, whose warnings
    pip would hide."""
    pytest.importorskip("setuptools")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in files.stdout.splitlines():
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(src / os.path.dirname(name), exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), src / name)
    r = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_wheel('dist'))"],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for warning in ("absent from the `packages`", "Package would be ignored", "SetuptoolsDeprecationWarning", "!!"):
        assert warning not in r.stdout + r.stderr, warning
    wheel = zipfile.ZipFile(src / "dist" / r.stdout.strip().splitlines()[-1])
    names = wheel.namelist()
    import nanolisa
    info = f"nanolisa-{nanolisa.__version__}.dist-info"
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert f"\nVersion: {nanolisa.__version__}\n" in metadata and "\nLicense-Expression: MIT\n" in metadata
    assert wheel.read(f"{info}/licenses/LICENSE") == open(os.path.join(ROOT, "LICENSE"), "rb").read()
    tiny = sorted(n for n in names if n.startswith("nanolisa/assets/tiny/"))
    assert tiny == [f"nanolisa/assets/tiny/{f}" for f in sorted(os.listdir(os.path.join(ROOT, "nanolisa/assets/tiny")))]
    assert all(f"nanolisa/cli/{t}.py" in names for t in TOOLS) and "nanolisa/__main__.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
