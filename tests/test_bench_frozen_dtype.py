"""bench/frozen_dtype.py (issue 18's experiment): the patched switch keeps frozen blocks in bf16 and active
ones in fp32, and under bf16 autocast a frozen block computes the same bits either way (the claim the
experiment's reading rests on: only a re-activated block's rounded updates differ)."""
import copy
import importlib.util
import os

import torch

import nanolisa
from nanolisa.lisa import LISA
from nanolisa.loss import next_token_nll
from tests.helpers import ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("frozen_dtype", os.path.join(ROOT, "bench", "frozen_dtype.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def loss_and_grads(model, seed: int, patched: bool, bench):
    switch = LISA.maybe_switch
    try:
        if patched:
            bench.patch_lisa()
        lisa = LISA(model, n_layers=1, interval=1, seed=seed)
        lisa.maybe_switch(0)
    finally:
        LISA.maybe_switch = switch
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = next_token_nll(model, ids, ids).mean()
    loss.backward()
    return lisa, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_blocks_in_bf16_compute_the_same_bits():
    bench = load_bench()
    model, _ = nanolisa.load_pretrained("tiny")
    plain = copy.deepcopy(model)
    lisa, loss, grads = loss_and_grads(model, 3, True, bench)
    _, want_loss, want_grads = loss_and_grads(plain, 3, False, bench)
    for i, block in enumerate(model.blocks):
        dtypes = {p.dtype for p in block.parameters()}
        assert dtypes == ({torch.float32} if i in lisa.active else {torch.bfloat16}), (i, dtypes)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and len(grads) > 2
    for n in grads:
        assert torch.equal(grads[n], want_grads[n]), n
