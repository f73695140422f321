"""LISA layer sampling (nanolisa/lisa.py) on tiny real models, with nanolisa's AdamW and torch's.

Covers the two LMFlow failure modes: optimizer state creeping up to full fine-tuning (issues 729, 768)
and layers unfrozen after start-up never being updated (issue 726).
"""
from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from nanolisa.adamw import AdamW
from nanolisa.config import ModelConfig
from nanolisa.errors import UserError
from nanolisa.lisa import GRADNORM_DECAY, GRADNORM_FLOOR, LISA
from tests.helpers import ROOT

V = 64


def tiny(n_layers: int = 6, tie: bool = False, model_type: str = "llama", seed: int = 0) -> nn.Module:
    from nanolisa.model import build_model
    if model_type == "gpt2":
        d = dict(model_type="gpt2", vocab_size=V, n_embd=16, n_layer=n_layers, n_head=2, n_positions=64,
                 tie_word_embeddings=tie)
    else:
        d = dict(model_type="llama", vocab_size=V, hidden_size=16, num_hidden_layers=n_layers,
                 num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                 max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_hf(d))
    model.init_weights()
    return model


def train_step(model, opt, step: int, lisa: LISA | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, V, (2, 12), generator=g)
    logits = model(x[:, :-1])  # (B, T-1, V): next-token loss
    F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1)).backward()
    if lisa is not None:
        lisa.measure()  # gradnorm's measurement, where the trainer takes it: after backward, before the step
    opt.step()
    opt.zero_grad()


def block_params(model, i):
    return list(model.blocks[i].parameters())


def expected_trainable(model, active) -> set[int]:
    mods = list(model.embed_modules) + list(model.head_modules) + [model.blocks[i] for i in active]
    return {id(p) for m in mods for p in m.parameters()}


def snapshot(model):
    return {id(p): p.detach().clone() for p in model.parameters()}


def test_only_sampled_blocks_and_embed_head_change():
    model = tiny()
    lisa = LISA(model, n_layers=2, interval=4, seed=3)
    opt = AdamW(model.parameters(), lr=1e-2)
    for interval in range(3):
        assert lisa.maybe_switch(interval * 4, opt)
        before = snapshot(model)
        for k in range(4):
            if k:
                assert not lisa.maybe_switch(interval * 4 + k, opt)
            train_step(model, opt, interval * 4 + k)
        changed = {id(p) for p in model.parameters() if not torch.equal(p.detach(), before[id(p)])}
        assert changed == expected_trainable(model, lisa.active)
        assert len(lisa.active) == 2


@pytest.mark.parametrize("opt_cls", [AdamW, torch.optim.AdamW])
def test_optimizer_state_tracks_active_set_without_creep(opt_cls):
    model = tiny()
    lisa = LISA(model, n_layers=2, interval=2, seed=0)
    opt = opt_cls(model.parameters(), lr=1e-3)  # built over ALL parameters
    state_numel = []
    for step in range(20):  # 10 switches
        if lisa.maybe_switch(step, opt):
            # right after a switch: no state left for any frozen parameter, none allocated yet for new ones
            assert {id(p) for p in opt.state} <= expected_trainable(model, lisa.active)
            assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        train_step(model, opt, step)
        assert {id(p) for p in opt.state} == expected_trainable(model, lisa.active)
        state_numel.append(sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values()))
    assert len(lisa.history) == 10
    assert len(set(state_numel)) == 1  # flat: blocks are all the same size and only 2 ever hold state
    full = 2 * sum(p.numel() for p in model.parameters())
    assert state_numel[0] < full


def test_block_frozen_at_start_is_updated_later():
    """LMFlow 726: the optimizer must update a block that was frozen when it was built."""
    model = tiny()
    lisa = LISA(model, n_layers=1, interval=3, seed=5)
    opt = AdamW(model.parameters(), lr=1e-2)  # built while every block is frozen
    assert not any(p.requires_grad for b in model.blocks for p in b.parameters())
    lisa.maybe_switch(0, opt)
    first = lisa.active[0]
    step = 0
    while True:  # train until a different block has been sampled
        lisa.maybe_switch(step, opt)
        if lisa.active[0] != first:
            break
        train_step(model, opt, step)
        step += 1
    late = lisa.active[0]
    before = [p.detach().clone() for p in block_params(model, late)]
    for k in range(3):
        lisa.maybe_switch(step + k, opt)
        train_step(model, opt, step + k)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, block_params(model, late)))
    assert all(float(opt.state[p]["step"]) == 3 for p in block_params(model, late))  # fresh state


def test_frozen_params_have_no_grad_after_switch():
    model = tiny()
    lisa = LISA(model, n_layers=3, interval=1, seed=1)
    opt = AdamW(model.parameters())
    lisa.maybe_switch(0, opt)
    x = torch.randint(0, V, (2, 8))
    model(x).sum().backward()  # grads on every trainable parameter, not zeroed
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    old = set(lisa.active)
    for step in range(1, 10):
        lisa.maybe_switch(step, opt)
        if set(lisa.active) != old:
            break
    for i in range(len(model.blocks)):
        for p in block_params(model, i):
            assert p.requires_grad == (i in lisa.active)
            if i not in lisa.active:
                assert p.grad is None


def test_same_seed_same_schedule_independent_of_global_rng():
    def schedule(seed, global_seed):
        torch.manual_seed(global_seed)
        random.seed(global_seed)
        lisa = LISA(tiny(n_layers=8), n_layers=3, interval=2, seed=seed)
        for step in range(40):
            lisa.maybe_switch(step)
            torch.rand(3), random.random()  # other consumers of the global RNGs
        return lisa.history

    a = schedule(7, 0)
    assert a == schedule(7, 123)
    assert a != schedule(8, 0)
    assert [s for s, _ in a] == list(range(0, 40, 2))
    assert all(len(set(act)) == 3 and all(0 <= i < 8 for i in act) for _, act in a)  # without replacement


def test_schedule_is_uniform():
    lisa = LISA(tiny(n_layers=4), n_layers=1, interval=1, seed=0)
    for step in range(2000):
        lisa.maybe_switch(step)
    counts = [sum(a == [i] for _, a in lisa.history) for i in range(4)]
    assert all(abs(c - 500) < 4 * (2000 * 0.25 * 0.75) ** 0.5 for c in counts)  # within 4 sigma


def binomial_ok(count: int, n: int, p: float) -> bool:
    """count is within 4 standard deviations of n draws with probability p."""
    return abs(count - n * p) <= 4 * (n * p * (1 - p)) ** 0.5 + 1e-9


def test_weighted_sampling_follows_the_probabilities():
    """gamma = 1: each block comes up with its (normalised) probability; a block of weight 0 never does."""
    probs = [1, 0, 2, 3, 4]  # normalised: 0.1, 0, 0.2, 0.3, 0.4
    lisa = LISA(Stub(), n_layers=1, interval=1, seed=0, sampling="weighted", probs=probs)
    n = 4000
    for step in range(n):
        lisa.maybe_switch(step)
    counts = Counter(a[0] for _, a in lisa.history)
    assert counts[1] == 0
    assert all(binomial_ok(counts[i], n, w / 10) for i, w in enumerate(probs)), counts


def test_weighted_sampling_of_two_blocks_draws_one_after_the_other():
    """gamma = 2: the set {i, j} comes up with p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j), as documented (one
    pick, then one among the rest, renormalised). Uniform sampling would give every pair 1/6."""
    p = [0.1, 0.2, 0.3, 0.4, 0.0]
    lisa = LISA(Stub(), n_layers=2, interval=1, seed=1, sampling="weighted", probs=p)
    n = 4000
    for step in range(n):
        lisa.maybe_switch(step)
    counts = Counter(tuple(a) for _, a in lisa.history)
    assert all(4 not in pair and len(set(pair)) == 2 for pair in counts)
    for i in range(4):
        for j in range(i + 1, 4):
            expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
            assert binomial_ok(counts[(i, j)], n, expected), ((i, j), counts[(i, j)], n * expected)


def set_block_grads(stub: Stub, lisa: LISA, norms: list[float]) -> None:
    """Give each active block of the stub a gradient whose L2 norm is norms[block]."""
    for i in lisa.active:
        block = stub.blocks[i]
        block.weight.grad = torch.zeros(2, 2)
        block.weight.grad[0, 0] = norms[i]
        block.bias.grad = torch.zeros(2)


def run_gradnorm(norms: list[float], steps: int, seed: int = 0, n_layers: int = 1) -> LISA:
    stub = Stub()
    lisa = LISA(stub, n_layers=n_layers, interval=1, seed=seed, sampling="gradnorm")
    for step in range(steps):
        torch.rand(3), random.random()  # other consumers of the global RNGs change nothing
        lisa.maybe_switch(step)
        set_block_grads(stub, lisa, norms)
        lisa.measure()
    return lisa


def test_gradnorm_samples_in_proportion_to_the_gradient_norm_with_a_floor():
    """Once every block has been measured, block i comes up with (1 - f) g_i / sum g + f / L: the block
    whose gradient is 0 still comes up with f / L."""
    norms = [0.0, 1.0, 2.0, 3.0, 4.0]
    burn_in, n = 200, 4000
    lisa = run_gradnorm(norms, burn_in + n)
    assert lisa.estimate == norms  # a constant norm: every running mean is exactly that norm
    f, L = GRADNORM_FLOOR, len(norms)
    expected = [(1 - f) * g / sum(norms) + f / L for g in norms]
    assert lisa.gradnorm_probs() == pytest.approx(expected)
    counts = Counter(a[0] for _, a in lisa.history[burn_in:])
    assert all(binomial_ok(counts[i], n, expected[i]) for i in range(L)), (counts, expected)


def test_gradnorm_estimate_is_a_running_mean_measured_only_while_active():
    stub = Stub()
    lisa = LISA(stub, n_layers=1, interval=2, seed=0, sampling="gradnorm")
    lisa.maybe_switch(0)
    (a,) = lisa.active
    for step, g in ((0, 1.0), (1, 3.0)):
        lisa.maybe_switch(step)
        set_block_grads(stub, lisa, [g] * 5)
        lisa.measure()
    set_block_grads(stub, lisa, [float("inf")] * 5)  # a step the fp16 GradScaler skips: not counted
    lisa.measure()
    lisa.maybe_switch(2)  # the interval's mean norm, 2, becomes block a's estimate
    assert lisa.estimate == [2.0 if i == a else None for i in range(5)]
    assert lisa.gradnorm_probs() == [0.2] * 5  # blocks not yet measured count as the largest estimate
    (b,) = lisa.active
    set_block_grads(stub, lisa, [6.0] * 5)
    lisa.measure()
    lisa.maybe_switch(4)
    assert lisa.estimate[b] == (6.0 if b != a else GRADNORM_DECAY * 2.0 + (1 - GRADNORM_DECAY) * 6.0)


@pytest.mark.parametrize("sampling", ["uniform", "weighted", "gradnorm"])
def test_every_policy_is_a_function_of_the_seed(sampling):
    """Same seed, same schedule (whatever else draws from the global RNGs); another seed, another one."""
    def schedule(seed):
        if sampling == "gradnorm":
            return run_gradnorm([0.5, 1.0, 2.0, 3.0, 4.0], 60, seed=seed, n_layers=2).history
        lisa = LISA(Stub(), n_layers=2, interval=1, seed=seed, sampling=sampling,
                    probs=[1, 2, 3, 4, 5] if sampling == "weighted" else None)
        for step in range(60):
            torch.rand(3), random.random()
            lisa.maybe_switch(step)
        return lisa.history

    a = schedule(7)
    assert a == schedule(7) and a != schedule(8)
    assert all(len(set(act)) == 2 for _, act in a)


@pytest.mark.parametrize("probs, message", [
    (None, "one probability per block"), ([1, 2], "one probability per block"),
    ([1, -1, 1, 1, 1], "must be >= 0"), ([0, 0, 0, 0, 1], "at least 2"), ([1, float("nan"), 1, 1, 1], ">= 0"),
])
def test_bad_weighted_probabilities_raise_user_error(probs, message):
    with pytest.raises(UserError, match=message):
        LISA(Stub(), n_layers=2, interval=1, sampling="weighted", probs=probs)


@pytest.mark.multiprocess
def test_gradnorm_estimates_are_global_and_the_same_on_every_rank():
    """2 ranks on gloo: under FSDP2 a block's gradient norm is summed over the shards (each rank alone holds
    about 1/sqrt(2) of it), under DDP the gradients are already whole. Either way every rank ends with the
    single process's estimates and draws the same blocks. DDP runs the single process's arithmetic: within
    1e-5. FSDP2's vocabulary-parallel loss sums each token's dL/dh in one part per rank, a different rounding,
    which ten AdamW steps (sign-like at first) grow: seen 3e-4, so within 1e-3, far below the 30% of a norm
    over this rank's shards only."""
    script = os.path.join(ROOT, "tests", "lisa_gradnorm_probe.py")
    one = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          script], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    ref = [json.loads(line) for line in one.stdout.splitlines() if line.startswith("{")][0]
    rows = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["parallel"], r["rank"]) for r in rows) == [("ddp", 0), ("ddp", 1), ("fsdp", 0), ("fsdp", 1)]
    assert sum(e is not None for e in ref["estimate"]) >= 3  # the estimates steered the later draws
    for parallel in ("fsdp", "ddp"):
        ranks = [r for r in rows if r["parallel"] == parallel]
        assert ranks[0]["estimate"] == ranks[1]["estimate"], parallel  # bit for bit
        for r in ranks:
            assert r["history"] == ref["history"], parallel
            assert [e is None for e in r["estimate"]] == [e is None for e in ref["estimate"]]
            tol = 1e-3 if parallel == "fsdp" else 1e-5
            assert all(abs(a - b) <= tol * b for a, b in zip(r["estimate"], ref["estimate"]) if b is not None), \
                (parallel, r["estimate"], ref["estimate"])


POLICIES = {"uniform": {}, "weighted": {"probs": [1, 0, 2, 3, 1, 5]}, "gradnorm": {}}


@pytest.mark.parametrize("sampling", list(POLICIES))
def test_state_dict_round_trip_resumes_exactly(sampling):
    """Model + AdamW + LISA checkpoint at step 13 (mid-interval: gradnorm has norms not yet folded in),
    resume: same schedule, same estimates and bit-identical weights, for every sampling policy."""
    total, cut = 24, 13
    kw = dict(n_layers=2, interval=3, sampling=sampling, **POLICIES[sampling])
    ref = tiny()
    lisa = LISA(ref, seed=11, **kw)
    opt = AdamW(ref.parameters(), lr=1e-2)
    for step in range(total):
        lisa.maybe_switch(step, opt)
        train_step(ref, opt, step, lisa)
        if step == cut - 1:
            buf = io.BytesIO()
            torch.save({"model": ref.state_dict(), "opt": opt.state_dict()}, buf)
            lisa_sd = json.loads(json.dumps(lisa.state_dict()))  # plain types: survives JSON too
    if sampling == "gradnorm":
        assert lisa_sd["pending_norms"] is not None and any(lisa_sd["pending_norms"][1])
        assert sum(e is not None for e in lisa.estimate) >= 3  # the estimates steered the later draws

    model = tiny(seed=99)  # different init, overwritten by the checkpoint
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model.load_state_dict(ckpt["model"])
    resumed = LISA(model, seed=0, **kw)  # seed comes from the checkpoint
    opt2 = AdamW(model.parameters(), lr=1e-2)
    resumed.load_state_dict(lisa_sd, opt2)
    opt2.load_state_dict(ckpt["opt"])
    for step in range(cut, total):
        resumed.maybe_switch(step, opt2)
        train_step(model, opt2, step, resumed)
    assert resumed.history == lisa.history
    assert resumed.state_dict() == lisa.state_dict()
    for (n, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n


class Stop(Exception):
    """Stands in for a kill right after a checkpoint."""


@pytest.mark.parametrize("sampling, probs", [("weighted", [1.0, 2.0, 0.0, 4.0]), ("gradnorm", None)])
def test_train_resumes_each_sampling_policy_bit_exactly(tmp_path, monkeypatch, sampling, probs):
    """train.py's loop, stopped right after the step-5 checkpoint (mid-interval: gradnorm holds norms not yet
    folded in) and resumed, ends with the weights and schedule of the run that was never stopped. (The
    kill-and-resume test in test_train.py covers uniform sampling.)"""
    import nanolisa.trainer as trainer
    from nanolisa.demo_data import TASKS, task_pairs
    from nanolisa.train_config import TrainConfig

    data = tmp_path / "data.json"  # 64 demo examples, one epoch of the 16 steps (the demo: 20000, ~1 s)
    data.write_text(json.dumps({"type": "text2text", "instances": [{"input": p, "output": a}
                                                                   for p, a in task_pairs(TASKS, 64, seed=0)]}))

    def cfg(out: str, **kw) -> TrainConfig:
        return TrainConfig(out=str(tmp_path / out), data=str(data), steps=16, interval=2, save_every=5, eval_every=0,
                           batch_size=4, seq_len=64, plot=False, quiet=True, lisa_sampling=sampling,
                           lisa_probs=probs, **kw)

    trainer.train(cfg("straight"))
    real_save = trainer.save_checkpoint

    def save_then_stop(*args, **kw):
        path = real_save(*args, **kw)
        if args[1] == 5:
            raise Stop
        return path

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        trainer.train(cfg("stopped"))
    monkeypatch.undo()
    state = json.load(open(tmp_path / "stopped" / "checkpoints" / "step-0000005" / "trainer_state.json"))["lisa"]
    if sampling == "gradnorm":
        assert state["pending_norms"] is not None and any(e is not None for e in state["estimate"])
    trainer.train(cfg("stopped", resume=True))

    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")]  # noqa: E731
    assert [(r["loss"], r["active"]) for r in rows("straight")] == [(r["loss"], r["active"]) for r in rows("stopped")]
    if sampling == "weighted":
        assert all(2 not in r["active"] for r in rows("straight"))


@pytest.mark.parametrize("n_layers,interval", [(-1, 5), (7, 5), (2, 0), (2, -3)])
def test_bad_arguments_raise_user_error(n_layers, interval):
    with pytest.raises(UserError, match="LISA"):
        LISA(tiny(), n_layers=n_layers, interval=interval, seed=0)


def test_edge_sizes_zero_and_all_layers():
    model = tiny(n_layers=3)
    LISA(model, n_layers=0, interval=1).maybe_switch(0)
    assert not any(p.requires_grad for p in model.blocks.parameters())
    LISA(model, n_layers=3, interval=1).maybe_switch(0)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_tied_embeddings_and_flags(model_type):
    model = tiny(n_layers=3, tie=True, model_type=model_type)
    shared = model.lm_head.weight
    assert shared is model.embed_modules[0].weight
    LISA(model, n_layers=1, interval=1, train_embeddings=False, train_head=True).maybe_switch(0)
    assert shared.requires_grad  # trainable because the head side is
    assert all(not p.requires_grad for m in model.embed_modules[1:] for p in m.parameters())  # GPT-2 wpe
    LISA(model, n_layers=1, interval=1, train_embeddings=True, train_head=False).maybe_switch(0)
    assert shared.requires_grad and not any(p.requires_grad for p in model.head_modules[0].parameters())
    LISA(model, n_layers=1, interval=1, train_embeddings=False, train_head=False).maybe_switch(0)
    assert not shared.requires_grad
    untied = tiny(n_layers=3, tie=False, model_type=model_type)
    LISA(untied, n_layers=1, interval=1, train_head=False).maybe_switch(0)
    assert untied.embed_modules[0].weight.requires_grad and not untied.lm_head.weight.requires_grad


class DDPLike(nn.Module):
    """Stands in for DistributedDataParallel: the model under `.module`, names prefixed with `module.`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


def test_works_through_wrappers_with_prefixed_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    model = tiny(n_layers=4)
    for i in range(len(model.blocks)):  # activation-checkpoint wrappers add `_checkpoint_wrapped_module.`
        model.blocks[i] = checkpoint_wrapper(model.blocks[i])
    wrapped = DDPLike(model)
    assert any("module." in n and "_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    lisa = LISA(wrapped, n_layers=2, interval=2, seed=4)
    opt = AdamW(wrapped.parameters(), lr=1e-2)
    lisa.maybe_switch(0, opt)
    before = snapshot(model)
    train_step(wrapped, opt, 0)
    changed = {id(p) for p in model.parameters() if not torch.equal(p.detach(), before[id(p)])}
    assert changed == expected_trainable(model, lisa.active)
    # torch.compile's wrapper (`_orig_mod.`) also resolves to the same modules (compiling is lazy: cheap).
    assert LISA(torch.compile(model), n_layers=1, interval=1).model is model


class Stub(nn.Module):
    """The minimum LISA needs: .blocks, .embed_modules, .head_modules (plus an unmanaged extra param)."""

    def __init__(self):
        super().__init__()
        self.emb, self.norm = nn.Linear(2, 2), nn.Linear(2, 2)
        self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(5))
        self.extra = nn.Parameter(torch.zeros(1), requires_grad=False)

    embed_modules = property(lambda self: [self.emb])
    head_modules = property(lambda self: [self.norm])


def test_stub_interface_and_unmanaged_params_untouched():
    stub = Stub()
    lisa = LISA(stub, n_layers=2, interval=1, seed=0)
    lisa.maybe_switch(0)
    assert [i for i, b in enumerate(stub.blocks) if b.weight.requires_grad] == lisa.active
    assert stub.emb.weight.requires_grad and stub.norm.weight.requires_grad
    assert not stub.extra.requires_grad  # LISA leaves parameters outside blocks/embed/head alone
