"""Several processes for real: train.py under torchrun with 2 CPU ranks on gloo, against the 1-rank run.

2 ranks with per-rank batch B must train exactly as 1 rank with batch 2B (same global batches, the loss a
mean over the global step's tokens), under FSDP2 and DDP, for LISA, full fine-tuning and LoRA. Resume,
SIGTERM, bad input and a two-"node" rendezvous are checked the same way, through the real launcher.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, run_script

pytestmark = pytest.mark.multiprocess

QUICK = ["--seq-len", "48", "--eval-every", "0", "--no-plot", "--quiet", "--lr", "1e-3", "--warmup", "0",
         "--threads", "1"]
TOL = 1e-5


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc_per_node N train.py ARGS` as a command line."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(ROOT, "train.py"), *args]


def torchrun(*args: str, nproc: int = 2, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=ENV, **kw)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def weights(out) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if os.path.exists(os.path.join(out, "adapter_model.safetensors")) \
        else "model.safetensors"
    return load_file(os.path.join(out, name))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


METHODS = {
    "lisa": ["--method", "lisa", "--interval", "2"],
    "full": ["--method", "full"],
    "lora": ["--method", "lora", "--lora-dropout", "0"],
}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The 1-rank reference of each method: batch 4, grad-accum 2 (so 2 ranks use batch 2)."""
    runs = {}
    for method, flags in METHODS.items():
        out = tmp_path_factory.mktemp(f"one-{method}") / "out"
        run_script("train.py", *QUICK, *flags, "--steps", "4", "--batch-size", "4", "--grad-accum", "2",
                   "--out", str(out), check=True)
        runs[method] = weights(out)
    return runs


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_train_like_one_rank_with_twice_the_batch(one_rank, tmp_path, parallel, method):
    out = tmp_path / "out"
    torchrun(*QUICK, *METHODS[method], "--steps", "4", "--batch-size", "2", "--grad-accum", "2",
             "--parallel", parallel, "--out", str(out))
    ours = weights(out)
    assert max_diff(ours, one_rank[method]) <= TOL
    assert not any(k.startswith(("module.", "_orig_mod.")) or "_checkpoint_wrapped_module" in k or
                   "_fsdp" in k for k in ours)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone wrote the metrics


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_killed_two_rank_lisa_run_resumes_bit_exactly(tmp_path):
    args = [*QUICK, "--steps", "8", "--interval", "3", "--batch-size", "2", "--save-every", "2"]
    straight = tmp_path / "straight"
    torchrun(*args, "--out", str(straight))
    out = tmp_path / "out"
    proc = subprocess.Popen(torchrun_cmd(*args, "--out", str(out)), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    ckpt = out / "checkpoints" / "step-0000004"
    deadline = time.time() + 120
    while not (ckpt / "trainer_state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    kill_tree(proc.pid)  # the launcher and both ranks, mid-run
    proc.wait()
    assert ckpt.exists() and not (out / "model.safetensors").exists()
    torchrun(*args, "--out", str(out), "--resume")
    assert max_diff(weights(out), weights(straight)) == 0.0


def test_sigterm_checkpoints_every_rank_and_resume_is_bit_exact(tmp_path):
    args = [*QUICK, "--steps", "40", "--interval", "3", "--batch-size", "2", "--save-every", "0"]
    straight = tmp_path / "straight"
    torchrun(*args, "--out", str(straight))
    out = tmp_path / "out"
    metrics = out / "checkpoints" / "metrics.jsonl"  # where a run keeps its metrics until it finishes
    proc = subprocess.Popen(torchrun_cmd(*args, "--out", str(out)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait until a few steps are done
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to every rank
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM after step" in err, err[-2000:]
    assert len(os.listdir(out / "checkpoints")) >= 1 and not (out / "model.safetensors").exists()
    torchrun(*args, "--out", str(out), "--resume")
    assert max_diff(weights(out), weights(straight)) == 0.0


def test_bad_data_under_torchrun_ends_every_rank_with_one_line(tmp_path):
    """Each rank's own stderr (torchrun --redirects keeps them apart) is one `error:` line, no traceback;
    the launcher exits non-zero within seconds, and --out is not left behind."""
    logs = tmp_path / "logs"
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "--log-dir", str(logs), "--redirects", "3", os.path.join(ROOT, "train.py"), *QUICK,
                        "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path / "out"), "--steps", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 30
    rank_logs = sorted(str(f) for f in logs.rglob("stderr.log"))
    assert len(rank_logs) == 2, rank_logs
    for f in rank_logs:
        text = open(f).read()
        assert "Traceback" not in text, text
        lines = text.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.json" in lines[0], text
    assert not (tmp_path / "out").exists()


def test_ranks_agree_on_lisa_and_hold_optimizer_state_of_their_shard_only(tmp_path):
    """FSDP2 LISA: each rank's AdamW state covers only the active block + embedding + head, sharded: about
    half of what one rank holds for the same model."""
    script = os.path.join(ROOT, "tests", "dist_state_probe.py")
    one = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    ref = json.loads(one.stdout.strip().splitlines()[-1])
    per_rank = [json.loads(line) for line in two.stdout.strip().splitlines() if line.startswith("{")]
    assert len(per_rank) == 2
    for r in per_rank:
        assert r["names"] == ref["names"]  # the active block(s) + embedding + norm + head, nothing else
        assert 0.4 <= r["state_bytes"] / ref["state_bytes"] <= 0.6
    assert {tuple(r["active"]) for r in per_rank} == {tuple(ref["active"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_rendezvous_train_like_one_rank(tmp_path):
    """Two torchrun launchers, --nnodes 2, one process each, meeting through a c10d rendezvous."""
    args = [*QUICK, "--method", "lisa", "--interval", "2", "--steps", "3", "--batch-size", "2"]
    one = tmp_path / "one"
    run_script("train.py", *args[:-1], "4", "--out", str(one), check=True)
    port = _free_port()
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                               "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                               "--rdzv_id=nanolisa-test", os.path.join(ROOT, "train.py"), *args, "--out", str(out)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert max_diff(weights(out), weights(one)) <= TOL
