"""A user's files and runs are never lost: --out rules, one run per directory, damaged checkpoints,
SIGTERM, write failures. Every case runs train.py as a user would and checks the exit status, the one
line on stderr, and the files that must survive byte for byte."""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import nanolisa
from tests.helpers import ROOT, one_line_error, run_script

QUICK = ["--batch-size", "4", "--seq-len", "48", "--no-plot", "--eval-every", "0", "--quiet", "--threads", "1"]


def train(*args, **kw):
    return run_script("train.py", *QUICK, *args, **kw)


def snapshot(d) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, f), d): open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(d) for f in files}


def test_foreign_files_in_out_are_refused_then_kept_with_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-extra.safetensors").write_bytes(b"not nanolisa's")
    before = snapshot(out)
    line = one_line_error(train("--steps", "2", "--out", str(out)))
    assert "--overwrite" in line and snapshot(out) == before
    train("--steps", "2", "--out", str(out), "--overwrite", check=True)
    after = snapshot(out)
    assert after["notes.txt"] == b"mine" and after["model-extra.safetensors"] == b"not nanolisa's"
    assert "model.safetensors" in after and "config.json" in after


def test_finished_run_is_not_replaced_or_resumed_silently(tmp_path):
    out = tmp_path / "out"
    train("--steps", "2", "--out", str(out), check=True)
    before = snapshot(out)
    assert "finished run" in one_line_error(train("--steps", "2", "--out", str(out)))
    assert "finished run" in one_line_error(train("--steps", "2", "--out", str(out), "--resume"))
    assert snapshot(out) == before


def test_out_equal_to_the_base_model_is_refused(tmp_path):
    base = tmp_path / "base"
    model, tok = nanolisa.load_pretrained("tiny")
    nanolisa.save_pretrained(model, tok, str(base))
    before = snapshot(base)
    line = one_line_error(train("--steps", "2", "--model", str(base), "--out", str(base) + "/"))
    assert "base model" in line and snapshot(base) == before


@pytest.mark.parametrize("out", ["/dev/null/x", "/proc/version/out"])
def test_impossible_out_is_one_line(out):
    assert "--out" in one_line_error(train("--steps", "2", "--out", out))


def test_second_run_on_the_same_out_is_refused_at_once(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *QUICK, "--steps", "400",
                              "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / ".nanolisa.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        line = one_line_error(train("--steps", "2", "--out", str(out), "--resume"))
        assert "in use by another run" in line and str(first.pid) in line and time.time() - t0 < 20
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "stopped by SIGTERM" in err


def test_sigterm_then_resume_is_bit_exact(tmp_path):
    args = ["--steps", "30", "--interval", "4", "--save-every", "0"]
    train(*args, "--out", str(tmp_path / "straight"), check=True)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *QUICK, *args, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "checkpoints" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "stopped by SIGTERM after step" in err and "Traceback" not in err, err
    train(*args, "--out", str(out), "--resume", check=True)
    assert snapshot(out)["model.safetensors"] == snapshot(tmp_path / "straight")["model.safetensors"]


def _checkpointed_run(tmp_path, args):
    """Kill -9 a run after its step-8 checkpoint: out holds step-4 and step-8."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *QUICK, *args, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "checkpoints" / "step-0000008" / "trainer_state.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert (out / "checkpoints" / "step-0000004").exists()
    return out


@pytest.mark.parametrize("damage", ["truncate-weights", "remove-rng", "bad-state"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, damage):
    args = ["--steps", "40", "--interval", "3", "--save-every", "4"]
    out = _checkpointed_run(tmp_path, args)
    newest = out / "checkpoints" / "step-0000008"
    if damage == "truncate-weights":
        f = next(f for f in newest.iterdir() if f.suffix == ".safetensors" and not f.name.startswith("rng"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "remove-rng":
        (newest / "rng-rank0.safetensors").unlink()
    else:
        (newest / "trainer_state.json").write_text("{not json")
    p = run_script("train.py", *QUICK, *args, "--out", str(out), "--resume")
    assert p.returncode == 0, p.stderr
    assert f"skipping {newest}" in p.stderr  # resumed from step 4 instead, bit-exactly:
    straight = tmp_path / "straight"
    train(*args, "--out", str(straight), check=True)
    assert snapshot(out)["model.safetensors"] == snapshot(straight)["model.safetensors"]


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    out = tmp_path / "out"
    p = train("--steps", "6", "--lr", "1e6", "--clip", "0", "--save-every", "1", "--out", str(out))
    line = one_line_error(p)
    assert "inf/NaN" in line or "loss became" in line
    for c in (out / "checkpoints").glob("step-*"):
        for f in c.glob("*.safetensors"):
            if not f.name.startswith("rng"):
                assert all(t.isfinite().all() for t in load_file(str(f)).values()), f"{c} holds non-finite weights"


def test_leftover_temporary_directories_are_removed_on_the_next_start(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / ".tmp-step-abc").mkdir(parents=True)
    (out / ".tmp-save-xyz").mkdir()
    (out / ".tmp-save-xyz" / "model.safetensors").write_bytes(b"partial")
    train("--steps", "2", "--out", str(out), check=True)
    assert not any(n.startswith(".tmp-") for n in os.listdir(out))


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_a_failed_checkpoint_write_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *QUICK, "--steps", "4", "--save-every", "2",
                        "--model", "tiny", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=_limit_file_size, timeout=120)
    line = one_line_error(p)
    assert "could not write" in line
    leftovers = [n for n in os.listdir(out / "checkpoints")] if (out / "checkpoints").exists() else []
    assert not any(n.startswith(".tmp-") for n in leftovers) and not any(n.startswith("step-") for n in leftovers)
