"""Model configuration, read from and written back to a Hugging Face `config.json`.

One dataclass covers every supported architecture. `from_hf` accepts the keys found in real checkpoints
(`rope_scaling`, `rope_theta`, `torch_dtype`) as well as those transformers 5 writes (`rope_parameters`,
`dtype`), and GPT-2's own names (`n_embd`, `n_layer`, ...). The original dictionary is kept, so `to_hf`
writes back a config.json that transformers, vLLM and llama.cpp's converter read as-is.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from nanolisa.errors import UserError
from nanolisa.files import read_json

# model_type -> the class name transformers (and vLLM, llama.cpp) look for in "architectures".
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# Weight dtypes by the short names the command-line tools take, and by the names config.json writes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from a short name ("bf16"), a config.json name ("bfloat16") or a dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES and dtype not in CONFIG_DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES.get(dtype) or CONFIG_DTYPES[dtype]


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v/o (Llama's attention_bias)
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"dynamic"|"llama3", "factor": ..., ...}
    dtype: str = "float32"  # the dtype the checkpoint's weights are stored in
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, for a faithful round trip

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise UserError(f"unsupported model_type {mt!r}: nanolisa supports {', '.join(ARCHITECTURES)}")
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        if mt == "gpt2":
            C = d.get("n_embd", 768)
            nh = d.get("n_head", 12)
            return cls(model_type=mt, vocab_size=d.get("vocab_size", 50257), hidden_size=C,
                       num_hidden_layers=d.get("n_layer", 12), num_attention_heads=nh, num_key_value_heads=nh,
                       head_dim=C // nh, intermediate_size=d.get("n_inner") or 4 * C,
                       max_position_embeddings=d.get("n_positions", 1024),
                       norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       hidden_act=d.get("activation_function", "gelu_new"),
                       tie_word_embeddings=d.get("tie_word_embeddings", True), dtype=dtype, hf=copy.deepcopy(d))
        C = d["hidden_size"]
        nh = d["num_attention_heads"]
        # Rope settings live in rope_theta + rope_scaling (classic) or in rope_parameters (transformers 5).
        rope = dict(d.get("rope_parameters") or {})
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or rope
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UserError(f"unsupported rope scaling {rope_type!r}: nanolisa supports {', '.join(ROPE_TYPES)}")
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
        return cls(model_type=mt, vocab_size=d["vocab_size"], hidden_size=C,
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=nh,
                   num_key_value_heads=d.get("num_key_value_heads") or nh,
                   head_dim=d.get("head_dim") or C // nh, intermediate_size=d["intermediate_size"],
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   norm_eps=d.get("rms_norm_eps", 1e-6), hidden_act=d.get("hidden_act", "silu"),
                   tie_word_embeddings=d.get("tie_word_embeddings", False),
                   attention_bias=d.get("attention_bias", False) if mt == "llama" else False,
                   qkv_bias=mt == "qwen2", mlp_bias=d.get("mlp_bias", False) if mt == "llama" else False,
                   rope_theta=float(theta), rope_scaling=scaling, dtype=dtype, hf=copy.deepcopy(d))

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The config.json to write: the original keys, with the architecture and weight dtype made explicit."""
        d = copy.deepcopy(self.hf)
        d["model_type"] = self.model_type
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        d["vocab_size"] = self.vocab_size
        d["tie_word_embeddings"] = self.tie_word_embeddings  # false once a LoRA merge untied the head
        # transformers 5 reads "dtype"; older readers (vLLM, llama.cpp's converter) read "torch_dtype".
        d["torch_dtype"] = d["dtype"] = dtype or self.dtype
        return d


def read_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    d = read_json(path)
    try:
        return ModelConfig.from_hf(d)
    except KeyError as e:
        raise UserError(f"{path}: missing key {e.args[0]!r}") from None
