"""Helpers shared by the test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
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


# A Llama whose weight matrices (all but attention's) are larger than every size threshold in the code --
# AdamW's TEMP_ELEMENTS (2**22 elements), the fused loss's chunking, activation_memory's RECOMPUTE_MIN_WIDTH
# (512) -- so tests see what a real model does: the embedding and head are 16384 x 512 = 8.4M elements, each
# MLP matrix 512 x 8448 = 4.3M.
BIG = dict(vocab_size=16384, hidden_size=512, intermediate_size=8448, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2)


def write_llama(path, dtype: str = "float32", seed: int = 0, max_shard_bytes: int = 5 * 2**30, **shape) -> str:
    """A random Llama checkpoint directory (safetensors, config.json, the tiny preset's tokenizer files, whose
    ids all fit the vocabulary), as save_pretrained writes it; returns its path. `shape` overrides BIG and
    any other config.json key (tie_word_embeddings=True, model_type="gpt2", ...)."""
    from nanolisa.config import ModelConfig
    from nanolisa.model import build_model
    from nanolisa.pretrained import save_pretrained
    from nanolisa.tokenizer import load_tokenizer
    tok = load_tokenizer("tiny")
    hf = {**dict(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, rope_theta=10000.0,
                 hidden_act="silu", tie_word_embeddings=False, max_position_embeddings=1024,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 torch_dtype="float32"), **BIG, **shape}
    if hf["model_type"] == "gpt2":
        hf = dict(model_type="gpt2", vocab_size=hf["vocab_size"], n_embd=hf["hidden_size"],
                  n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_positions=64,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = build_model(ModelConfig.from_hf(hf))
    torch.manual_seed(seed)
    model.init_weights()
    save_pretrained(model, tok, str(path), dtype=dtype, max_shard_bytes=max_shard_bytes)
    return str(path)


# ---- tokenizers built for the tests (tests/test_tokenizer.py, tests/test_outputs.py) ---------------------
# A small corpus to train them on: ASCII, digits and operators, accents, CJK and an emoji.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you doing today?",
    "Large language models are trained on lots of text.",
    "Fine-tuning adapts a model to a task with a few examples.",
    "Numbers like 12 + 7 = 19 and 100 - 1 = 99 appear too.",
    "Reverse the string abc to get cba. Ünïcödé: 世界, emoji 🙂.",
]

# ChatML, the chat template the test tokenizers carry.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def train_sentencepiece(d, corpus, **kw):
    """A SentencePiece tokenizer.model trained on corpus (a list of lines) in directory d (a Path); kw are
    SentencePieceTrainer's options. Skips the test where sentencepiece is not installed."""
    spm = pytest.importorskip("sentencepiece")
    (d / "corpus.txt").write_text("\n".join(corpus))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"),
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, **kw)
    os.remove(d / "corpus.txt")
    os.remove(d / "tokenizer.vocab")
    return str(d)
