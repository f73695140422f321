"""Model configuration, read from and written back to a Hugging Face `config.json`.

One dataclass covers every supported architecture. `from_hf` accepts the keys found in real checkpoints
(`rope_scaling`, `rope_theta`, `torch_dtype`) as well as those transformers 5 writes (`rope_parameters`,
`dtype`), and GPT-2's own names (`n_embd`, `n_layer`, ...). The original dictionary is kept, so `to_hf`
writes back a config.json that transformers, vLLM and llama.cpp's converter read as-is.

Every field the model reads is checked as it is read (types, ranges, the activation's name, the fields a
rope scaling type needs), so a bad config.json stops train, eval and chat alike with one line that names
the field.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from nanolisa.activations import ACTIVATIONS
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
    def from_hf(cls, d: Any) -> "ModelConfig":
        """The config of a config.json dictionary, checked: every field the model reads must have the right
        type and range, so a bad config.json is one line that names the field, never a traceback at the
        first forward pass or, worse, a model that runs with settings its checkpoint was not trained with."""
        if not isinstance(d, dict):
            raise UserError(f"not a JSON object of settings: {_show(d)}")
        mt = d.get("model_type")
        if not isinstance(mt, str) or mt not in ARCHITECTURES:
            raise UserError(f"unsupported model_type {mt!r}: nanolisa supports {', '.join(ARCHITECTURES)}")
        fields = _gpt2_fields(d) if mt == "gpt2" else _llama_fields(d, mt)
        dtype = _get(d, "dtype" if d.get("dtype") else "torch_dtype", "str", "float32", nullable=True) or "float32"
        return cls(model_type=mt, dtype=dtype, hf=copy.deepcopy(d), **fields)

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


# ----------------------------------------------------------------------------------------------------------
# Reading config.json's fields, each checked. Keys and defaults are those of transformers' config classes;
# error messages name the key as config.json spells it.

REQUIRED = object()  # the default of a key config.json must have


def _show(v: Any) -> str:
    """A value as config.json writes it, shortened: "128" (a string), true, null, [1, 2]."""
    text = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _get(d: dict, key: str, kind: str, default: Any = REQUIRED, nullable: bool = False, where: str = "") -> Any:
    """d[key] checked against kind: "size" (an integer >= 1), "number" (finite and > 0), "bool" or "str".
    A missing key gives the default; null too where transformers writes null for "unset" (nullable)."""
    name = where + key
    v = d.get(key)
    if key not in d or (v is None and nullable):
        if default is REQUIRED:
            raise UserError(f"missing key {name!r}")
        return default
    if kind == "size":  # bool is an int in Python, but true is not a size
        ok, want = type(v) is int and v >= 1, "a positive integer"
    elif kind == "number":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        want = "a finite number > 0"
    elif kind == "bool":
        ok, want = isinstance(v, bool), "true or false"
    else:
        ok, want = isinstance(v, str), "a string"
    if not ok:
        raise UserError(f"{name} must be {want}, got {_show(v)}")
    return float(v) if kind == "number" else v


def _activation(d: dict, key: str, default: str) -> str:
    act = _get(d, key, "str", default)
    if act not in ACTIVATIONS:
        raise UserError(f"{key} {act!r} is not supported: use one of {', '.join(ACTIVATIONS)}")
    return act


def _gpt2_fields(d: dict) -> dict[str, Any]:
    C, nh = _get(d, "n_embd", "size", 768), _get(d, "n_head", "size", 12)
    if C % nh:
        raise UserError(f"n_embd ({C}) must be divisible by n_head ({nh})")
    # Attention variants nanolisa's GPT-2 does not implement: refused rather than silently computed otherwise.
    if not _get(d, "scale_attn_weights", "bool", True):
        raise UserError("scale_attn_weights false is not supported: nanolisa's GPT-2 always scales attention "
                        "scores by 1/sqrt(head size)")
    if _get(d, "scale_attn_by_inverse_layer_idx", "bool", False):
        raise UserError("scale_attn_by_inverse_layer_idx true is not supported by nanolisa's GPT-2")
    return dict(vocab_size=_get(d, "vocab_size", "size", 50257), hidden_size=C,
                num_hidden_layers=_get(d, "n_layer", "size", 12), num_attention_heads=nh, num_key_value_heads=nh,
                head_dim=C // nh, intermediate_size=_get(d, "n_inner", "size", 4 * C, nullable=True),
                max_position_embeddings=_get(d, "n_positions", "size", 1024),
                norm_eps=_get(d, "layer_norm_epsilon", "number", 1e-5),
                hidden_act=_activation(d, "activation_function", "gelu_new"),
                tie_word_embeddings=_get(d, "tie_word_embeddings", "bool", True))


def _llama_fields(d: dict, model_type: str) -> dict[str, Any]:
    C, nh = _get(d, "hidden_size", "size"), _get(d, "num_attention_heads", "size")
    nkv = _get(d, "num_key_value_heads", "size", nh, nullable=True)
    if nh % nkv:
        raise UserError(f"num_attention_heads ({nh}) must be a multiple of num_key_value_heads ({nkv})")
    head_dim = _get(d, "head_dim", "size", None, nullable=True)
    if head_dim is None:
        if C % nh:
            raise UserError(f"hidden_size ({C}) must be divisible by num_attention_heads ({nh}), "
                            f"or config.json must give head_dim")
        head_dim = C // nh
    if head_dim % 2:
        raise UserError(f"head size {head_dim} is odd: rotary embeddings rotate pairs of channels")
    max_pos = _get(d, "max_position_embeddings", "size", 2048)
    theta, scaling = _rope(d, head_dim)
    llama = model_type == "llama"  # attention_bias and mlp_bias are Llama's; Qwen2 always has q/k/v biases
    return dict(vocab_size=_get(d, "vocab_size", "size"), hidden_size=C,
                num_hidden_layers=_get(d, "num_hidden_layers", "size"), num_attention_heads=nh,
                num_key_value_heads=nkv, head_dim=head_dim, intermediate_size=_get(d, "intermediate_size", "size"),
                max_position_embeddings=max_pos, norm_eps=_get(d, "rms_norm_eps", "number", 1e-6),
                hidden_act=_activation(d, "hidden_act", "silu"),
                tie_word_embeddings=_get(d, "tie_word_embeddings", "bool", False),
                attention_bias=_get(d, "attention_bias", "bool", False) if llama else False,
                qkv_bias=model_type == "qwen2", mlp_bias=_get(d, "mlp_bias", "bool", False) if llama else False,
                rope_theta=theta, rope_scaling=scaling)


def _rope(d: dict, head_dim: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from rope_theta + rope_scaling (classic) or rope_parameters (transformers 5),
    with the fields each scaling type needs."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise UserError(f"{key} must be an object like {{\"rope_type\": \"linear\", \"factor\": 2.0}}, "
                            f"got {_show(d[key])}")
    params = d.get("rope_parameters") or {}
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    scaling = {k: v for k, v in (d.get("rope_scaling") or params).items() if k != "rope_theta"}
    theta = _get(d, "rope_theta", "number", None, nullable=True)
    if theta is None:
        theta = _get(params, "rope_theta", "number", 10000.0, where="rope_parameters.")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise UserError(f"unsupported rope scaling {rope_type!r}: nanolisa supports {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    where = key + "."
    _get(scaling, "factor", "number", where=where)
    if rope_type == "dynamic" and head_dim <= 2:
        raise UserError(f"dynamic rope scaling needs a head size above 2, got {head_dim}")
    if rope_type == "llama3":
        lo = _get(scaling, "low_freq_factor", "number", where=where)
        hi = _get(scaling, "high_freq_factor", "number", where=where)
        _get(scaling, "original_max_position_embeddings", "size", where=where)
        if hi <= lo:
            raise UserError(f"{where}high_freq_factor ({hi:g}) must be greater than low_freq_factor ({lo:g})")
    return theta, {**scaling, "rope_type": rope_type}


def read_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    d = read_json(path)
    try:
        return ModelConfig.from_hf(d)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
