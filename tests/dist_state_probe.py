"""Run by tests/test_distributed.py, alone or under torchrun: two FSDP2 LISA steps on the tiny preset, then
one JSON line per rank (printed by rank 0) with the parameters that hold AdamW state and the bytes of that state on this rank,
and the LM head as the rank holds it (its class, its rows)."""
import json

import torch

import nanolisa
from nanolisa.adamw import AdamW
from nanolisa.lisa import LISA
from nanolisa.loss import next_token_nll
from nanolisa.parallel import close_world, gather, init_world, shard

world, device = init_world("cpu")
model, _ = nanolisa.load_pretrained("tiny")
lisa = LISA(model, n_layers=1, interval=10, seed=3)
if world.distributed:
    shard(model)
opt = AdamW(model.parameters(), lr=1e-3)
torch.manual_seed(world.rank)
for step in range(2):
    lisa.maybe_switch(step, opt)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    next_token_nll(model, ids, ids).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
names = {p: n for n, p in model.named_parameters()}
local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
state_bytes = sum(local(v).numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
row = {"rank": world.rank, "active": lisa.active, "names": sorted(names[p] for p in opt.state),
       "state_bytes": state_bytes, "head": type(model.lm_head).__name__,
       "head_rows": local(model.lm_head.weight).shape[0], "vocab": model.config.vocab_size}
rows = gather(row, world)  # rank 0 prints every rank's line: the ranks' stdout would interleave
if world.is_main:
    for r in rows:
        print(json.dumps(r), flush=True)
close_world()
