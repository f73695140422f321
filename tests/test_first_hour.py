"""A new user's first hour (issue 25): the commands README.md gives after `make demo` run as written in a
fresh copy of the checkout, and `make demo` prints the same ones; a Python without torch gets one line; how
make picks the torch build; --version on every tool; the tiny preset written to disk loads in transformers
and peft."""
import os
import re
import shutil
import site
import subprocess
import sys

import pytest
import torch
import transformers as tf

import nanolisa
from nanolisa.cli import common
from tests.helpers import ROOT

STEPS = "20"  # what the README's train.py commands get appended, instead of 3000 steps each


def fresh_copy(dest) -> str:
    """The checkout's tracked files (its working-tree versions) in dest, as a fresh clone has them."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    for name in files.stdout.splitlines():
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy(os.path.join(ROOT, name), os.path.join(dest, name))
    return str(dest)


def venv_like_make_demo(clone: str) -> None:
    """clone/.venv as `make demo` leaves it, without downloading anything: a real venv whose site-packages
    point (a .pth line) at this test's packages, and the torchrun pip writes into bin/. nanolisa itself is
    not installed in it: the scripts run the copy's own code, as they do after make demo."""
    venv = os.path.join(clone, ".venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    with open(os.path.join(venv, "lib", py, "site-packages", "test-env.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    torchrun = os.path.join(venv, "bin", "torchrun")
    with open(torchrun, "w") as f:
        f.write(f"#!{venv}/bin/python\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n")
    os.chmod(torchrun, 0o755)


def recipe(target: str) -> list[str]:
    """The command lines of a Makefile target, as make runs them ($(BIN) expanded, @ dropped)."""
    text = open(os.path.join(ROOT, "Makefile")).read()
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    return [line.strip().lstrip("@").replace("$(BIN)", ".venv/bin") for line in body.splitlines()]


def after_demo_block() -> list[str]:
    """The command lines of README.md's block after `make demo`."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"### After `make demo`.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def without_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line)


def shell(cmd: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)


@pytest.mark.multiprocess
def test_the_commands_after_make_demo_run_as_written(tmp_path):
    """make demo's own commands (its pip installs aside: the venv is made here), then every command of the
    README's block, in a fresh copy of the checkout. Each train.py gets `--steps 30` appended (argparse: the
    last value wins), the one change from the text: the block's runs take minutes each as written."""
    clone = fresh_copy(tmp_path / "nanolisa")
    venv_like_make_demo(clone)
    printed = []
    for cmd in recipe("demo"):
        if "pip install" in cmd:
            continue
        if cmd.startswith(".venv/bin/python train.py"):
            cmd += f" --steps {STEPS}"
        r = shell(cmd, clone)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
        printed += r.stdout.splitlines() if cmd.startswith("echo") else []
    assert os.path.isfile(os.path.join(clone, "out", "training_args.json"))
    block = after_demo_block()
    # make demo ends by printing the README's commands (the same, one per line)
    assert sorted(line.strip() for line in printed if line.startswith("  ")) == sorted(map(without_comment, block))
    results = {}
    for line in block:
        cmd = without_comment(line) + f" --steps {STEPS}" if "train.py" in line else line
        r = results[line] = shell(cmd, clone)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd, r.stderr[-3000:])
    one_shot, interactive, nll, train_chat, eval_chat, torchrun = (results[line] for line in block)
    assert len(one_shot.stdout.splitlines()) == 1 and "completion mode" in one_shot.stderr
    assert interactive.stdout == "" and "completion mode" in interactive.stderr  # stdin closed: it just ends
    assert nll.stdout.startswith("nll ") and "examples of demo:test" in nll.stdout
    assert eval_chat.stdout.startswith("accuracy ") and "examples of demo:conversation:test" in eval_chat.stdout
    assert "note: evaluating on demo:conversation:test" in eval_chat.stderr
    assert "torchrun: 2 processes, FSDP2 on gloo; rank 0 cpu, rank 1 cpu" in torchrun.stderr
    assert os.path.isfile(os.path.join(clone, "out-2procs", "model.safetensors"))


def make(*args: str, path: str) -> str:
    if not shutil.which("make"):
        pytest.skip("no make here")
    r = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": path})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_installs_the_cpu_torch_where_there_is_no_gpu(tmp_path):
    """Without nvidia-smi, torch comes from PyTorch's CPU index (when reachable); with one, or when told,
    from pip's default index. make demo installs nanolisa without -e: no setuptools warning box."""
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    plain = "/usr/bin:/bin"
    if shutil.which("nvidia-smi", path=plain) is None:
        assert cpu_index in make("venv", path=plain)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\n")
    (fake / "nvidia-smi").chmod(0o755)
    assert cpu_index not in make("venv", path=f"{fake}:{plain}")
    assert cpu_index not in make("venv", "TORCH_INDEX=", path=plain)
    installs = [line for line in make("demo", path=plain).splitlines() if "pip install" in line]
    assert installs and not any(" -e " in line for line in installs)


@pytest.mark.parametrize("script", ["train.py", "chat.py", "eval.py"])
def test_a_python_without_torch_gets_one_line(script):
    """`python3 chat.py` with a Python that is not .venv's: one line naming what is missing and the Python
    to use, not a ModuleNotFoundError traceback. (-S: this Python without its site-packages.)"""
    r = subprocess.run([sys.executable, "-S", os.path.join(ROOT, script), "--help"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and " is not installed for " in lines[0]
    assert f"({os.path.join(ROOT, '.venv', 'bin', 'python')} {script} ...)" in lines[0]


@pytest.mark.parametrize("tool", ["train", "chat", "eval", "merge", "preset"])
def test_every_tool_says_its_version(tool, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"nanolisa.cli.{tool}").parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"nanolisa {nanolisa.__version__} (torch {torch.__version__})\n"
    from nanolisa.cli import main
    main(["--version"])
    assert capsys.readouterr().out == common.version() + "\n"


def test_license_is_the_mit_license_pyproject_names():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License\n") and "Permission is hereby granted, free of charge" in text
    assert 'license = "MIT"' in open(os.path.join(ROOT, "pyproject.toml")).read()


def test_the_tiny_preset_written_to_disk_loads_in_transformers_and_peft(tmp_path, capsys):
    """`nanolisa preset tiny --out DIR`: transformers loads the very model --model tiny is, and peft applies a
    LoRA adapter trained on `tiny` to it exactly as nanolisa does."""
    import peft
    from nanolisa.cli import preset
    from nanolisa.lora import apply_lora, lora_modules, save_adapter
    d = tmp_path / "tiny-base"
    preset.main(["tiny", "--out", str(d)])
    assert str(d) in capsys.readouterr().out
    model, tok = nanolisa.load_pretrained("tiny")
    ids = torch.tensor([tok.encode("upper(cat)=")])
    hf = tf.AutoModelForCausalLM.from_pretrained(str(d)).eval()
    with torch.no_grad():
        base = hf(ids).logits
        torch.testing.assert_close(base, model(ids), rtol=1e-5, atol=1e-5)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.2)
        ours = model(ids)
    save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path="tiny", tokenizer=tok)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(ids).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    # never over what is there
    from nanolisa.cli.common import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: preset.main(["tiny", "--out", str(d)]))
    assert e.value.code == 2 and "is not an empty directory" in capsys.readouterr().err
