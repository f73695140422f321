"""bench/gpu_check.py and bench/run_all.py, on tiny shapes: every step of what a GPU user and the idle-machine
side-by-side run will do, minus the timings (which a test cannot judge)."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_gpu_check_cpu_smoke_runs_every_section_and_prints_one_table(tmp_path):
    """Triton's interpreter stands in for the GPU (the kernels' self-check itself is tests/test_kernels.py's)."""
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--skip", "kernels", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in open(out)]
    assert [r["section"] for r in rows] == ["attention", "fused loss", "7B LISA"] + ["vs peers"] * 3
    assert all(r["ok"] is True for r in rows)
    assert float(rows[0]["error"]) < 1e-4  # flash attention against model.py's, forward and backward
    assert abs(rows[1]["loss_full"] - rows[1]["loss_fused"]) < 1e-2 * rows[1]["loss_full"]
    table = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # one table: a header and a line per row


def test_side_by_side_table_and_figure(tmp_path):
    """One nanolisa run and its peer run on the tiny shape, through the table, the LISA bound and the PNG."""
    md, png = tmp_path / "t.md", tmp_path / "t.png"
    p = subprocess.run([sys.executable, "bench/run_all.py", "--shape", "tiny", "--no-extra", "--only",
                        "nanolisa:full,peers:full", "--out", str(md), "--png", str(png)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in md.read_text().splitlines() if x.startswith("| full |")][0].split("|")
    ours_tps, peers_tps, ours_mb, peers_mb = float(line[2]), float(line[3]), int(line[5]), int(line[6])
    assert min(ours_tps, peers_tps) > 0 and 100 < min(ours_mb, peers_mb)
    assert line[4].strip().startswith(f"{ours_tps / peers_tps:.2f}x")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lisa_bound_and_its_ratio():
    import run_all
    # Shape a: blocks of 4 x 768^2 + 3 x 768 x 2048 weights, a head of 320 x 768: close to 3 / (2 + 1/12).
    block, head = 4 * 768 ** 2 + 3 * 768 * 2048, 320 * 768
    assert run_all.lisa_bound("a") == pytest.approx(3 * (12 * block + head) / (25 * block + 3 * head), rel=1e-12)
    assert run_all.lisa_bound("a") == pytest.approx(3 / (2 + 1 / 12), rel=2e-3)
    # Shape c: vocabulary 32000, the head is 2.55 blocks that LISA trains too: 1.284x, not 1.41x.
    block, head = 4 * 1024 ** 2 + 3 * 1024 * 2816, 32000 * 1024
    assert run_all.lisa_bound("c") == pytest.approx(3 * (8 * block + head) / (17 * block + 3 * head), rel=1e-12)
    assert 1.28 < run_all.lisa_bound("c") < 1.29
    # tiny: 4 blocks of 128 wide with 2 of 4 kv heads (k, v half of q), ffn 256, vocab 300.
    block, head = 128 * 128 * 3 + 3 * 128 * 256, 300 * 128
    bound = 3 * (4 * block + head) / (9 * block + 3 * head)
    assert run_all.lisa_bound("tiny") == pytest.approx(bound, rel=1e-12)
    rows = {"nanolisa:full": {"tokens_per_s": 100.0, "peak_rss_mb": 1000},
            "nanolisa:lisa-g1": {"tokens_per_s": 0.9 * bound * 100 + 0.01, "peak_rss_mb": 450}}
    text = "\n".join(run_all.side_by_side("tiny", rows))
    assert f"{bound:.3f}x full's ({bound * 100:.1f} tokens/s)" in text and "**0.90 of the bound** (met" in text
    assert "0.45x (met: <= 0.5x)" in text
