"""Built-in models that need no download: `--model tiny` (the default of train.py, chat.py and eval.py).

A preset is a Llama-architecture config plus the small tokenizer shipped in nanolisa/assets/<name>/. Its
weights are random, drawn from a fixed seed, so every machine starts from the same model; fine-tuning it
on the bundled demo data (nanolisa/demo_data.py) shows LISA learning in a few minutes on a CPU.
"""
from __future__ import annotations

import os

import torch

from nanolisa.config import ModelConfig, to_dtype
from nanolisa.model import CausalLM, build_model
from nanolisa.tokenizer import Tokenizer, load_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), "assets")

# name -> Llama shape. "tiny": 4 blocks of width 128 with grouped-query attention, 0.8M parameters with
# the byte-level vocabulary: small enough that `python train.py` learns the demo tasks in minutes on a CPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024),
}


# The training settings train.py uses for a preset when their flags are not given. A preset starts from
# random weights, so it wants a far higher learning rate than fine-tuning a pretrained checkpoint does, and
# LISA re-samples its block every 100 steps rather than 20: each switch starts the new block's AdamW
# moments afresh, whose first steps move every weight by about lr, and from random weights that kept some
# seeds on the early plateau (seed 3 of the demo: 45% held-out exact match at interval 20; bench/RESULTS.md).
RECIPES: dict[str, dict] = {
    "tiny": dict(lr=3e-3, warmup=30, steps=3000, batch_size=32, interval=100),
}


def preset_config(name: str, tokenizer) -> ModelConfig:
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=tokenizer.vocab_size,
              rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id, torch_dtype="float32", **PRESETS[name])
    return ModelConfig.from_hf(hf)


def load_preset(name: str, dtype=None, device=None, seed: int = 0) -> tuple[CausalLM, Tokenizer]:
    tokenizer = load_tokenizer(os.path.join(ASSETS, name))
    with torch.device("meta"):  # no default initialisation to throw away (nor random numbers to use up)
        model = build_model(preset_config(name, tokenizer))
    model.to_empty(device="cpu")
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same random weights everywhere, without disturbing the caller's RNG
    model.init_weights()
    torch.random.set_rng_state(rng_state)
    model.generation_config = None
    return model.to(device=device or "cpu", dtype=to_dtype(dtype) or torch.float32), tokenizer
