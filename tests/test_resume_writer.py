"""resume_writer.py's StreamingHFWriter: DCP's HuggingFace checkpoint files, written tensor by tensor.

The same tensors and DCP metadata as DCP's own writer (which built each file in memory first), loaded back
by DCP's HuggingFaceStorageReader, and the host memory of writing no longer doubles what is saved."""
import os
import subprocess
import sys

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from nanolisa.resume_writer import StreamingHFWriter
from tests.helpers import ROOT


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight/a": torch.randn(7, 5, generator=g), "weight/b": torch.randn(3, generator=g).bfloat16(),
            "adamw/a/step": torch.tensor(3.0), "adamw/a/exp_avg": torch.randn(7, 5, generator=g)}


def read(directory) -> dict:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                out[name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def test_same_files_as_dcps_writer_and_loaded_back(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    dcp.save(state(), no_dist=True, storage_writer=StreamingHFWriter(str(ours)))
    dcp.save(state(), no_dist=True, storage_writer=dcp.HuggingFaceStorageWriter(str(theirs)))
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    a, b = read(ours), read(theirs)
    assert a.keys() == b.keys() and a
    for name in a:
        (ta, ma), (tb, mb) = a[name], b[name]
        assert ma == mb and ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)
    loaded = {k: torch.zeros_like(v) for k, v in state().items()}
    dcp.load(loaded, no_dist=True, storage_reader=dcp.HuggingFaceStorageReader(str(ours)))
    assert all(torch.equal(loaded[k], v) for k, v in state().items())


# The peak is read from /proc/self/status (VmHWM, this address space's own high-water mark), not ru_maxrss: a
# process started from a large one (pytest, late in the suite) reports the parent's peak in ru_maxrss.
PROBE = """
import sys, torch, torch.distributed.checkpoint as dcp
from nanolisa.resume_writer import StreamingHFWriter
def peak_kib():
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sd = {f"t{i}": torch.randn(2**23) for i in range(8)}  # 8 x 32 MiB, each above AdamW's 2**22 slices
before = peak_kib()
writer = StreamingHFWriter(sys.argv[1]) if sys.argv[2] == "ours" else dcp.HuggingFaceStorageWriter(sys.argv[1])
dcp.save(sd, no_dist=True, storage_writer=writer)
print((peak_kib() - before) // 1024)
"""


def test_writing_adds_at_most_one_tensor_of_host_memory(tmp_path):
    """256 MiB saved: DCP's writer grows the process by about that much, ours by about one 32 MiB tensor."""
    grown = {}
    for who in ("ours", "theirs"):
        p = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / who), who], capture_output=True, text=True,
                           cwd=ROOT, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}, check=True)
        grown[who] = int(p.stdout.split()[-1])  # MiB
    assert grown["theirs"] >= 200, grown  # the whole file in memory (the test can fail: DCP's writer must show it)
    assert grown["ours"] <= 64, grown
