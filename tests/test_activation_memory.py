"""nanolisa/activation_memory.py: fewer bytes saved for backward, and bit-for-bit the same training.

Each lever is checked two ways: the weights after a few LISA steps with switches (and LoRA steps) are
bit-identical to model.py's plain path, in fp32 and under bf16 autocast; and the bytes autograd saves for
one block, counted with saved_tensors_hooks, fall by what the lever removes (and no more is recomputed
than was asked for).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from nanolisa.activation_memory import LeanBlock, LeanLinear, LeanMLP, lean
from nanolisa.adamw import AdamW
from nanolisa.config import ModelConfig
from nanolisa.lisa import LISA
from nanolisa.loss import next_token_nll
from nanolisa.model import build_model
from nanolisa.trainer import param_groups

V, C, H, T = 97, 64, 176, 24


def small(model_type: str = "llama", layers: int = 4) -> torch.nn.Module:
    if model_type == "gpt2":
        d = dict(model_type="gpt2", vocab_size=V, n_embd=C, n_layer=layers, n_head=4, n_positions=64)
    else:
        d = dict(model_type=model_type, vocab_size=V, hidden_size=C, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=H, max_position_embeddings=64)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf(d))
    model.init_weights()
    return model.train()


def train(model, method: str, steps: int, amp: bool) -> dict[str, torch.Tensor]:
    """A few steps of LISA (a switch every step) or LoRA; returns the weights."""
    lisa = None
    if method == "lisa":
        lisa = LISA(model, n_layers=1, interval=1, seed=3)
    else:
        from nanolisa.lora import apply_lora, mark_only_lora_trainable
        torch.manual_seed(1)
        apply_lora(model, r=4, alpha=8, targets="all-linear")
        mark_only_lora_trainable(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)  # B = 0 would leave A's gradient zero
    opt = AdamW(param_groups(model, weight_decay=0.0), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        if lisa:
            lisa.maybe_switch(step, opt)
        ids = torch.randint(0, V, (2, T), generator=g)  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
            loss = next_token_nll(model, ids, ids).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method,amp,ckpt,family", [
    ("lisa", False, False, "llama"), ("lisa", True, False, "llama"), ("lisa", True, True, "llama"),
    ("lisa", False, True, "gemma2"), ("lora", True, False, "llama"), ("lisa", True, True, "gpt2")])
def test_bit_identical_to_the_plain_model(method, amp, ckpt, family):
    plain = small(family)
    leaned = lean(copy.deepcopy(plain), checkpoint_frozen=ckpt, min_width=0)
    assert isinstance(leaned.blocks[0], LeanBlock)
    if family != "gpt2":
        assert isinstance(leaned.blocks[0].mlp, LeanMLP) and isinstance(leaned.blocks[0].mlp.down_proj, LeanLinear)
    assert list(leaned.state_dict()) == list(plain.state_dict())  # keys unchanged
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    want, got = train(plain, method, 5, amp), train(leaned, method, 5, amp)
    changed = [k for k in want if k not in start or not torch.equal(want[k], start[k])]
    assert len(changed) >= (5 if method == "lisa" else 8)  # several blocks trained, each by its own switch
    for k in want:
        assert torch.equal(want[k], got[k]), k


def saved_bytes(model, amp: bool) -> list[int]:
    """Bytes autograd saves in one forward, per block (distinct storages that are not parameters)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    per_block: list[dict[int, int]] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: per_block.append({})) for b in model.blocks]

    def pack(t):
        s = t.untyped_storage()
        if per_block and s.data_ptr() not in params:
            per_block[-1][s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, V, (2, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
            model.hidden_states(ids)
    for h in hooks:
        h.remove()
    return [sum(d.values()) for d in per_block]


def test_what_a_frozen_block_keeps():
    plain = small()
    for b in list(plain.blocks)[1:]:
        b.requires_grad_(False)  # block 0 trains, the rest are frozen (the embedding trains)
    leaned = lean(copy.deepcopy(plain), min_width=0)
    ckpt = lean(copy.deepcopy(plain), checkpoint_frozen=True, min_width=0)
    n = 2 * T  # tokens
    block_weights = sum(p.numel() for p in plain.blocks[1].parameters() if p.dim() == 2)
    for amp, item in ((False, 4), (True, 2)):
        p, lb, cb = saved_bytes(plain, amp), saved_bytes(leaned, amp), saved_bytes(ckpt, amp)
        # GatedAct: act(gate) no longer kept, in trained and frozen blocks alike (H values per token); in a
        # trained block down_proj's input act(gate) * up is recomputed too (another H)
        assert p[0] - lb[0] == 2 * n * H * item
        # a frozen Linear under bf16 autocast no longer keeps the bf16 copy of its weight
        assert p[1] - lb[1] == n * H * item + (2 * block_weights if amp else 0)
        # a checkpointed frozen block keeps its input only: (B, T, C) in the residual stream's fp32
        assert cb[1] == n * C * 4 and cb[0] == lb[0]


def test_checkpoint_frozen_needs_a_frozen_block():
    model = lean(small(), checkpoint_frozen=True)  # full fine-tuning: nothing is frozen, nothing recomputed
    assert saved_bytes(model, False) == saved_bytes(lean(small()), False)


def test_gated_act_only_from_the_minimum_width():
    """GatedAct's recomputation is skipped on narrow models (where it costs time and saves little) and used
    from RECOMPUTE_MIN_WIDTH up; the frozen-Linear and checkpointing levers apply at every width."""
    from nanolisa.activation_memory import RECOMPUTE_MIN_WIDTH
    narrow = lean(small())  # C = 64
    assert not isinstance(narrow.blocks[0].mlp, LeanMLP) and isinstance(narrow.blocks[0].mlp.down_proj, LeanLinear)
    assert isinstance(lean(small(), min_width=C).blocks[0].mlp, LeanMLP)
    with torch.device("meta"):
        wide = build_model(ModelConfig.from_hf(dict(
            model_type="llama", vocab_size=V, hidden_size=RECOMPUTE_MIN_WIDTH, num_hidden_layers=1,
            num_attention_heads=4, intermediate_size=2 * RECOMPUTE_MIN_WIDTH, max_position_embeddings=64)))
    assert isinstance(lean(wide).blocks[0].mlp, LeanMLP)


@pytest.mark.parametrize("grad_ckpt,amp", [(False, False), (True, False), (True, True)])
def test_full_fine_tuning_recomputes_down_projs_input_bit_identically(grad_ckpt, amp):
    """Every block trains: down_proj's input is stored as gate and up and recomputed in backward, also when
    activation checkpointing's own hooks are around it (they then receive gate and up)."""
    plain = small()
    plain.gradient_checkpointing = grad_ckpt
    leaned = lean(copy.deepcopy(plain), min_width=0)
    start = {k: v.clone() for k, v in plain.state_dict().items()}
    results = []
    for model in (plain, leaned):
        opt = AdamW(param_groups(model, weight_decay=0.0), lr=1e-2, weight_decay=0.0)
        g = torch.Generator().manual_seed(7)
        for _ in range(3):
            ids = torch.randint(0, V, (2, T), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
                loss = next_token_nll(model, ids, ids).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append(model.state_dict())
    want, got = results
    assert all(not torch.equal(want[k], start[k]) for k in want)  # every tensor trained
    for k in want:
        assert torch.equal(want[k], got[k]), k
    if not grad_ckpt:
        assert saved_bytes(leaned, amp)[0] < saved_bytes(plain, amp)[0]
