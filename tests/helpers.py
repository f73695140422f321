"""Helpers shared by the test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import transformers as tf

from nanolisa.loss import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source checkout

# Tiny random configs of every supported family, as transformers builds them: the parity oracles.
SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    "llama-gqa": lambda: tf.LlamaConfig(**SMALL),
    "llama-bias": lambda: tf.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "llama3-rope": lambda: tf.LlamaConfig(**SMALL, max_position_embeddings=64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}),
    "llama-linear-rope": lambda: tf.LlamaConfig(**SMALL, rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-dynamic-rope": lambda: tf.LlamaConfig(**SMALL, max_position_embeddings=16,
                                                 rope_scaling={"type": "dynamic", "factor": 2.0}),
    "mistral": lambda: tf.MistralConfig(**{**SMALL, "num_key_value_heads": 1}),
    "qwen2-tied": lambda: tf.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "gpt2": lambda: tf.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0),
}


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (norm weights and biases too), so every parameter is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and torch.all(p == 1) else 0.0))


def run_script(script: str, *args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run a top-level script (train.py, chat.py, eval.py) or `-m module` as a user would, capturing output."""
    cmd = [sys.executable, *(["-m", args[0]] if script == "-m" else [os.path.join(ROOT, script)]),
           *(args[1:] if script == "-m" else args)]
    kw.setdefault("timeout", 300)
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def one_line_error(p: subprocess.CompletedProcess, code: int = 2) -> str:
    """Assert p failed with `code` and exactly one `error: ...` line on stderr, no traceback; return it."""
    assert p.returncode == code, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def labelled_runs(ids, labels):
    """Runs of consecutive labelled token ids (checks each label equals its input id)."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs
