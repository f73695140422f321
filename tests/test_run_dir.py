"""A user's files and runs are never lost: --out rules, one run per directory, damaged checkpoints,
SIGTERM, write failures. Every case runs train.py as a user would and checks the exit status, the one
line on stderr, and the files that must survive byte for byte."""
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanolisa
import nanolisa.trainer
from nanolisa.errors import UserError
from nanolisa.parallel import World
from nanolisa.resume import _write_manifest as write_manifest
from nanolisa.train_config import TrainConfig
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


def test_finished_run_is_not_replaced_and_resuming_it_does_nothing(tmp_path):
    """A fresh run into a finished run's --out is refused; --resume there (a pre-empted job requeued after its
    final save) succeeds and says there is nothing to do."""
    out = tmp_path / "out"
    train("--steps", "2", "--out", str(out), check=True)
    before = snapshot(out)
    assert "finished run" in one_line_error(train("--steps", "2", "--out", str(out)))
    p = train("--steps", "2", "--out", str(out), "--resume")
    assert p.returncode == 0 and p.stdout == "", p.stderr
    assert p.stderr.strip().splitlines() == [f"note: --resume: {out} holds a finished run and no checkpoint; nothing "
                                             f"to resume, nothing was trained (pass --overwrite without --resume to "
                                             f"train into it again)"]
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
    """"At once": about as soon as a bad flag is refused (timed here and now: the machine may be busy), not
    when the first run ends."""
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *QUICK, "--steps", "400",
                              "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out / ".nanolisa.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        t0 = time.time()
        one_line_error(train("--steps", "2", "--lr", "inf", "--out", str(tmp_path / "other")))
        t1 = time.time()
        line = one_line_error(train("--steps", "2", "--out", str(out), "--resume"))
        assert "in use by another run" in line and str(first.pid) in line
        assert time.time() - t1 < 2 * (t1 - t0) + 10
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


# ----------------------------------------------------------------------------------------------------------
# Damaged checkpoints: every damage leads to the older intact checkpoint (and the uninterrupted run's
# result) or to a one-line refusal, never to a traceback or to another result with exit status 0.

RUN = dict(steps=12, save_every=4, interval=3, batch_size=4, seq_len=48, eval_every=0, plot=False, quiet=True,
           threads=1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's weights."""
    out = tmp_path_factory.mktemp("straight") / "out"
    nanolisa.trainer.train(TrainConfig(out=str(out), **RUN))
    return (out / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory):
    """An --out whose run stopped after its last step, before the final save: it holds the step-4 and
    step-8 checkpoints (the final save is made to fail)."""
    out = tmp_path_factory.mktemp("unfinished") / "out"
    mp = pytest.MonkeyPatch()
    mp.setattr(nanolisa.trainer, "finish", lambda *a: (_ for _ in ()).throw(RuntimeError("stopped here")))
    with pytest.raises(RuntimeError, match="stopped here"):
        nanolisa.trainer.train(TrainConfig(out=str(out), **RUN))
    mp.undo()
    assert sorted(os.listdir(out / "checkpoints")) == ["metrics.jsonl", "step-0000004", "step-0000008"]
    return out


def _edit_header(ckpt, key: str, old: bytes, new: bytes) -> None:
    """Change `old` to `new` (the same length) in the header entry of tensor `key`: the file keeps its size."""
    f = next(f for f in ckpt.glob("model-*.safetensors"))
    raw = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = raw.index(b',"%s":{' % key.encode(), 8, 8 + n) + 1
    at = raw.index(old, start, 8 + n)
    assert len(old) == len(new) and at < raw.index(b"}", start)
    raw[at:at + len(old)] = new
    f.write_bytes(bytes(raw))


def _edit_state(ckpt, edit) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    edit(state)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def _flip_a_weight_byte(ckpt) -> None:
    f = next(f for f in ckpt.glob("model-*.safetensors"))
    raw = bytearray(f.read_bytes())
    raw[-100] ^= 0x40
    f.write_bytes(bytes(raw))


def _frozen_block_param(ckpt) -> str:
    active = json.loads((ckpt / "trainer_state.json").read_text())["lisa"]["active"]
    return f"model.layers.{next(i for i in range(4) if i not in active)}.mlp.up_proj.weight"


NORM = "weight/model.norm.weight"
HEAD = "weight/lm_head.weight"
# (id, damage, what follows once the manifest is rewritten to match: "fallback", a refusal's words, or None
# where only the manifest can see the damage)
DAMAGES = [
    ("renamed-tensor", lambda c: _edit_header(c, NORM, b"norm.weight", b"norm.weighx"), "fallback"),
    ("transposed", lambda c: _edit_header(c, HEAD, b"[261,128]", b"[128,261]"), "fallback"),
    ("dtype", lambda c: _edit_header(c, NORM, b'"F32"', b'"I32"'), "fallback"),
    ("flipped-bit", _flip_a_weight_byte, None),
    ("truncated", lambda c: (lambda f: f.write_bytes(f.read_bytes()[:-4096]))(next(c.glob("model-*.safetensors"))),
     "fallback"),
    ("rng-size", lambda c: save_file({"torch": torch.zeros(100, dtype=torch.uint8)}, str(c / "rng-rank0.safetensors")),
     "fallback"),
    ("rng-missing", lambda c: (c / "rng-rank0.safetensors").unlink(), "fallback"),
    ("state-not-json", lambda c: (c / "trainer_state.json").write_text("{not json"), "fallback"),
    ("step-negative", lambda c: _edit_state(c, lambda s: s.update(step=-5)), "fallback"),
    ("step-huge", lambda c: _edit_state(c, lambda s: s.update(step=10**9)), "fallback"),
    ("step-string", lambda c: _edit_state(c, lambda s: s.update(step="8")), "fallback"),
    ("data-position", lambda c: _edit_state(c, lambda s: s["data"].update(batch=s["data"]["batch"] + 1)), "fallback"),
    ("data-epoch", lambda c: _edit_state(c, lambda s: s["data"].update(epoch=-1)), "fallback"),
    ("lisa-block", lambda c: _edit_state(c, lambda s: s["lisa"].update(active=[99])), "fallback"),
    ("lisa-rng", lambda c: _edit_state(c, lambda s: s["lisa"].update(rng_state=[3, [1, 2], None])), "fallback"),
    ("lisa-missing", lambda c: _edit_state(c, lambda s: s.pop("lisa")), "fallback"),
    ("adamw-unknown", lambda c: _edit_state(c, lambda s: s["adamw"].append("model.layers.9.mlp.up_proj.weight")),
     "fallback"),
    ("adamw-frozen", lambda c: _edit_state(c, lambda s: s["adamw"].append(_frozen_block_param(c))), "fallback"),
    ("python-rng", lambda c: _edit_state(c, lambda s: s.update(python_rng=[3, [0], None])), "fallback"),
    ("scaler", lambda c: _edit_state(c, lambda s: s.update(scaler={"scale": 2.0})), "fallback"),
    ("extra-file", lambda c: shutil.copy(c / "rng-rank0.safetensors", c / "rng-rank1.safetensors"), "fallback"),
    ("manifest-missing", lambda c: (c / "manifest.json").unlink(), None),
    # not damage but another run's settings: refused in one line once the manifest agrees
    ("settings", lambda c: _edit_state(c, lambda s: s["config"].update(lr=0.5)), "different settings (lr"),
    ("process-count", lambda c: _edit_state(c, lambda s: (s.update(world_size=2), s["config"].update(parallel="fsdp"))),
     "was written by 2 process(es), this run has 1"),  # not "--parallel", which torchrun set, not the user
    ("data-size", lambda c: _edit_state(c, lambda s: s["data"].update(num_examples=5)), "saved for 5 examples"),
]


@pytest.mark.parametrize("manifest", ["as-written", "rewritten"])
@pytest.mark.parametrize("case, damage, rewritten", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_checkpoint_is_skipped_or_refused(tmp_path, capsys, straight, unfinished, case, damage, rewritten,
                                                    manifest):
    """"as-written": the damage came after the checkpoint was written (the manifest sees it). "rewritten": the
    manifest agrees with the damaged files (written after the damage, or edited with it): the checks of
    every field and tensor against the run must see it themselves."""
    if manifest == "rewritten" and rewritten is None:
        pytest.skip("only a manifest can see this damage")
    out = tmp_path / "out"
    shutil.copytree(unfinished, out)
    newest = out / "checkpoints" / "step-0000008"
    damage(newest)
    if manifest == "rewritten":
        write_manifest(str(newest), World())
    capsys.readouterr()
    if manifest == "rewritten" and rewritten != "fallback":
        with pytest.raises(UserError, match=re.escape(rewritten)):
            nanolisa.trainer.train(TrainConfig(out=str(out), resume=True, **RUN))
        return
    nanolisa.trainer.train(TrainConfig(out=str(out), resume=True, **RUN))
    err = capsys.readouterr().err
    assert f"note: skipping the checkpoint {newest}: " in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert (out / "model.safetensors").read_bytes() == straight  # resumed from step 4, bit-exactly
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_no_intact_checkpoint_is_one_line(tmp_path, unfinished):
    out = tmp_path / "out"
    shutil.copytree(unfinished, out)
    for ckpt in (out / "checkpoints").glob("step-*"):
        _flip_a_weight_byte(ckpt)
    p = train("--steps", "12", "--save-every", "4", "--interval", "3", "--out", str(out), "--resume")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "no intact checkpoint to resume from (2 damaged" in lines[-1]
    assert sum(line.startswith("note: skipping") for line in lines) == 2 and len(lines) == 3


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


def test_fp16_resume_restores_the_loss_scale(tmp_path, monkeypatch):
    """fp16 trains through torch's GradScaler, whose scale grows after good steps and halves at an overflow
    (that step is skipped). Growing after every good step (not every 2000), it overflows every other step
    of this run: a resume that restarted the scale would skip other steps and end elsewhere."""
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: scaler(device, growth_interval=1))
    run = dict(RUN, dtype="fp16")
    nanolisa.trainer.train(TrainConfig(out=str(tmp_path / "straight"), **run))
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(nanolisa.trainer, "finish", lambda *a: (_ for _ in ()).throw(RuntimeError("stopped here")))
        with pytest.raises(RuntimeError, match="stopped here"):
            nanolisa.trainer.train(TrainConfig(out=str(out), **run))
    shutil.rmtree(out / "checkpoints" / "step-0000008")  # resume from step 4: overflows are still to come
    scale = json.loads((out / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())["scaler"]["scale"]
    assert scale != scaler("cpu").get_scale()  # the scale moved by step 4
    nanolisa.trainer.train(TrainConfig(out=str(out), resume=True, **run))
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "straight" / "model.safetensors").read_bytes()


def test_a_kill_during_the_final_save_loses_no_metrics_rows(tmp_path, straight, monkeypatch):
    """Killed after the final save moved the metrics to --out but before it removed the checkpoints: the
    resumed run starts from its checkpoint's own rows and ends with every row."""
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(nanolisa.trainer, "remove_checkpoints", lambda out: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            nanolisa.trainer.train(TrainConfig(out=str(out), **RUN))
    assert not (out / "checkpoints" / "metrics.jsonl").exists() and (out / "checkpoints" / "step-0000008").is_dir()
    nanolisa.trainer.train(TrainConfig(out=str(out), resume=True, **RUN))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert (out / "model.safetensors").read_bytes() == straight


def test_sigterm_during_the_final_save_then_a_requeued_resume_succeeds(tmp_path, straight, monkeypatch, capsys):
    """A SIGTERM that arrives while the final model is written waits for the save: the run finishes. The
    scheduler then requeues the job with --resume, which succeeds with nothing to do."""
    finish = nanolisa.trainer.finish

    def sigterm_then_finish(*a):
        os.kill(os.getpid(), signal.SIGTERM)
        finish(*a)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(nanolisa.trainer, "finish", sigterm_then_finish)
        final = nanolisa.trainer.train(TrainConfig(out=str(out), **RUN))
    assert final["step"] == 12 and (out / "model.safetensors").read_bytes() == straight
    before = snapshot(out)
    capsys.readouterr()
    assert nanolisa.trainer.train(TrainConfig(out=str(out), resume=True, **RUN)) == {}
    assert "holds a finished run and no checkpoint; nothing to resume" in capsys.readouterr().err
    assert snapshot(out) == before


def _start(out, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *QUICK, *args, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(out, n: int) -> None:
    metrics = out / "checkpoints" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        time.sleep(0.02)


def test_ctrl_c_checkpoints_like_sigterm_and_resume_is_bit_exact(tmp_path):
    args = ["--steps", "30", "--interval", "4", "--save-every", "0"]
    train(*args, "--out", str(tmp_path / "straight"), check=True)
    out = tmp_path / "out"
    proc = _start(out, *args)
    _wait_for_rows(out, 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "note: Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to stop at once)" in err
    assert "note: stopped by Ctrl-C after step" in err and "continue it with the same command plus --resume" in err
    train(*args, "--out", str(out), "--resume", check=True)
    assert snapshot(out)["model.safetensors"] == snapshot(tmp_path / "straight")["model.safetensors"]


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """Steps long enough (16 micro-batches) that the second Ctrl-C comes within the step the first one let
    finish: the run stops at once, without the checkpoint."""
    out = tmp_path / "out"
    proc = _start(out, "--steps", "30", "--save-every", "0", "--grad-accum", "16", "--batch-size", "16")
    _wait_for_rows(out, 1)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # until the first Ctrl-C is taken
        if "Ctrl-C again" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], err
    assert not list((out / "checkpoints").glob("step-*"))


def _sigterm_once_blocked(proc) -> None:
    """Send SIGTERM as soon as train.py has blocked it (its first lines, before torch is imported)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        status = open(f"/proc/{proc.pid}/status").read()
        blocked = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
        if blocked & (1 << (signal.SIGTERM - 1)):
            proc.send_signal(signal.SIGTERM)
            return
        time.sleep(0.001)
    raise AssertionError("train.py never blocked SIGTERM")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the signal mask from /proc")
@pytest.mark.parametrize("case", ["bad-input", "good-input"])
def test_a_sigterm_before_the_inputs_are_checked_waits_for_them(tmp_path, case):
    """torchrun sends SIGTERM to every rank as soon as one fails: a rank still importing torch must still
    report its own bad input in one line. With good input, the SIGTERM then stops the run before it starts."""
    out = tmp_path / "out"
    data = ["--data", str(tmp_path / "missing.json")] if case == "bad-input" else []
    proc = _start(out, "--steps", "2", *data)
    _sigterm_once_blocked(proc)
    _, err = proc.communicate(timeout=120)
    if case == "bad-input":
        assert proc.returncode == 2 and err.strip().splitlines() == [f"error: --data {tmp_path / 'missing.json'}: "
                                                                     f"no such file or directory"], err
    else:
        assert proc.returncode == 143 and err.strip().splitlines() == [
            "note: stopped by SIGTERM before training started; nothing new to save"], err
    assert not out.exists()
