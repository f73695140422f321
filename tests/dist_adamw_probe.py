"""Run by tests/test_distributed.py under torchrun: AdamW on FSDP2-sharded tensors larger than AdamW's
TEMP_ELEMENTS (2**22), against torch.optim.AdamW on the same sharded model and on an unsharded copy.
Rank 0 prints one JSON line: the largest difference of each run from the unsharded torch run, and how far
the weights moved."""
import json

import torch
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

from nanolisa.adamw import TEMP_ELEMENTS, AdamW
from nanolisa.parallel import full_tensor, init_world
from probe_exit import finish

world, device = init_world("cpu")


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(32000, 256), nn.Linear(256, 16448), nn.Linear(16448, 7))


def train(opt_class, sharded: bool) -> dict[str, torch.Tensor]:
    model = make()
    assert max(p.numel() for p in model.parameters()) > TEMP_ELEMENTS
    if sharded:
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    opt = opt_class(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 32000, (8, 16), generator=g)  # every rank the whole batch: no data split
        model(ids).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters()}


start = {n: p.detach().clone() for n, p in make().named_parameters()}
ref = train(torch.optim.AdamW, sharded=False)
rows = {}
for name, opt_class in (("nanolisa", AdamW), ("torch", torch.optim.AdamW)):
    got = train(opt_class, sharded=True)
    rows[name] = {"max_diff": max((got[n] - ref[n]).abs().max().item() for n in ref),
                  "min_moved": min((got[n] - start[n]).abs().max().item() for n in ref)}
if world.is_main:
    print(json.dumps(rows), flush=True)
finish()  # tests/probe_exit.py

