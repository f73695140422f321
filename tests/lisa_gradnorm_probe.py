"""Run by tests/test_lisa.py, alone or under torchrun: LISA with --lisa-sampling gradnorm on the tiny preset,
made data-parallel as the trainer does it (FSDP2 shards; then DDP, rebuilt at each switch), every rank on the
same batches (so the averaged gradients are the single process's). Rank 0 prints one JSON line per rank
and way of sharing: the blocks drawn at each switch and the running gradient-norm estimates."""
import json

import torch

import nanolisa
from nanolisa.adamw import AdamW
from nanolisa.lisa import LISA
from nanolisa.loss import next_token_nll
from nanolisa.parallel import gather, init_world, replicate, shard
from probe_exit import finish


def run(parallel: str) -> dict:
    model, _ = nanolisa.load_pretrained("tiny")
    lisa = LISA(model, n_layers=1, interval=1, seed=3, sampling="gradnorm")
    if world.distributed and parallel == "fsdp":
        shard(model)
    opt = AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)  # the same batches on every rank
    module = None
    for step in range(10):
        if lisa.maybe_switch(step, opt) and world.distributed and parallel == "ddp":
            module = replicate(model, first=module is None)
        ids = torch.randint(0, model.config.vocab_size, (2, 32))
        next_token_nll(module or model, ids, ids).sum().backward()
        lisa.measure()
        opt.step()
        opt.zero_grad(set_to_none=True)
    lisa.maybe_switch(10)  # folds the last interval's norms into the estimates
    return {"parallel": parallel, "rank": world.rank, "history": lisa.history, "estimate": lisa.estimate}


world, device = init_world("cpu")
rows = [row for parallel in ("fsdp", "ddp") for row in gather(run(parallel), world)]
if world.is_main:  # rank 0 prints every rank's lines: the ranks' stdout would interleave
    for r in rows:
        print(json.dumps(r), flush=True)
finish()  # tests/probe_exit.py

