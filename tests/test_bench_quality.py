"""bench/quality.py's smallest configuration end to end (the full table is a benchmark, not a test): data,
pre-training with train.py, one fine-tuning process per method, the table."""
import json
import math
import subprocess
import sys

from tests.helpers import ROOT

METHODS = ["full", "lora-r8", "lisa-g1-weighted"]  # every branch: full, LoRA, LISA with measured --lisa-probs


def test_quality_smoke(tmp_path):
    work = tmp_path / "work"
    p = subprocess.run([sys.executable, "bench/quality.py", "--smoke", "--threads", "1", "--work", str(work),
                        "--methods", ",".join(METHODS)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(work / "runs.jsonl")]
    assert [r["method"] for r in rows] == METHODS
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("val_loss", "test_loss", "peak_rss_mb", "wall_s"))
        assert 0 <= r["test_em"] <= 1
    table = {line.split("|")[1].strip(): line.split("|") for line in p.stdout.splitlines() if line.startswith("| ")}
    assert set(METHODS) <= set(table)
    # what trains at once: LoRA's adapters < LISA's embedding + head + one block < every weight
    state = {m: float(table[m][6]) for m in METHODS}
    assert state["lora-r8"] < state["lisa-g1-weighted"] < state["full"]
    assert not (work / "runs" / "full-lr0.003-seed0").exists()  # each run's model is removed once scored
    # a --work holding anything else is refused, untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    p = subprocess.run([sys.executable, "bench/quality.py", "--smoke", "--work", str(other)], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and "holds other files" in p.stderr and (other / "mine.txt").read_text() == "x"
