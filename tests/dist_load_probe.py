"""Run by tests/test_distributed.py under torchrun: load a checkpoint straight into FSDP2 shards
(nanolisa/sharded_load.py) and print, from rank 0, one JSON line per rank: whether every parameter equals
the one-process load bit for bit, and the rank's peak memory while loading against its shard.

    torchrun --nproc_per_node 2 tests/dist_load_probe.py MODEL_DIR [lora]
"""
import json
import resource
import sys

import torch

import nanolisa
from nanolisa.lora import apply_lora
from nanolisa.parallel import full_tensor, gather, init_world
from nanolisa.runtime import return_freed_memory_to_os
from nanolisa.sharded_load import load_sharded
from probe_exit import finish


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20


def prepare(model) -> None:
    if lora:
        apply_lora(model, r=4, dora=True)


path, lora = sys.argv[1], sys.argv[2:] == ["lora"]
return_freed_memory_to_os()  # as train.py does at start-up
world, device = init_world("cpu")
import torch._dynamo  # noqa: E402,F401  the process's own: fully_shard and torch.optim import it (144 MB of RSS)
before = rss_mb()
model, _, _ = load_sharded(path, device, world, prepare, None, seed=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - before  # MB above the start
local = sum(p.to_local().numel() * 4 for p in model.parameters())
largest = max(p.numel() * 4 for p in model.parameters())
torch.manual_seed(0)  # the one-process load, as the trainer does it: seed, load, prepare
ref = nanolisa.load_model(path, dtype=torch.float32)
prepare(ref)
ours = {n: full_tensor(p.detach()) for n, p in model.named_parameters()}
mismatch = [n for n, p in ref.named_parameters() if not torch.equal(ours[n], p.detach())]
row = {"rank": world.rank, "mismatch": mismatch, "n": len(ours), "peak_mb": peak, "shard_mb": local / 2**20,
       "largest_mb": largest / 2**20}
rows = gather(row, world)
if world.is_main:
    for r in rows:
        print(json.dumps(r), flush=True)
finish()  # tests/probe_exit.py

