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

# model_type -> the class name transformers (and vLLM, llama.cpp) look for in "architectures". model.py's
# docstring has the table of what each family's block does; `_FAMILY` below sets it from config.json.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# model_types refused with a reason of their own (anything else unknown gets the supported list).
REFUSED = {
    "gemma3": "Gemma 3 4B and larger (Gemma3ForConditionalGeneration) carry a vision tower, which nanolisa "
              "neither loads nor saves; fine-tune a text-only gemma3_text checkpoint instead: gemma-3-1b, or this "
              "model's language model saved on its own (README.md, 'Gemma 3 4B and larger', shows how)",
}
LAYER_TYPES = ("full_attention", "sliding_attention")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
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
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"dynamic"|"llama3"|"longrope", "factor": ..., ...}
    dtype: str = "float32"  # the dtype the checkpoint's weights are stored in
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, for a faithful round trip
    # What the decoder block does, as the family's modeling file does it (model.py's table; `_FAMILY` sets
    # these from model_type and config.json). The defaults are Llama's.
    norm_placement: str = "pre"  # "pre" (Llama), "sandwich" (Gemma 2/3: before and after), "post" (OLMo 2)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's 1 + w
    norm_weight_fp32: bool = False  # ... and multiplies in fp32 before casting back (Gemma, OLMo 2), not after
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: "head" (Qwen3, Gemma 3) or "projection" (OLMo 2)
    fused_projections: bool = False  # one qkv_proj and one gate_up_proj, as Phi-3 stores them
    query_scale: float | None = None  # q.k scale; None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float | None = None  # attention scores -> c tanh(scores / c) (Gemma 2)
    final_softcap: float | None = None  # logits -> c tanh(logits / c) (Gemma 2)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to their dtype (Gemma)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * factor channels (Phi-3.5/4-mini)
    rope_fp32: bool = False  # q and k rotated in fp32, then cast back (OLMo 2); else in their own dtype
    sliding_window: int | None = None  # a sliding layer's query sees itself and the window - 1 keys before it
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer; () = all full
    rope_layers: tuple[bool, ...] = ()  # whether each layer rotates q and k (SmolLM3's no_rope_layers); () = all
    rope_local: tuple[float, dict | None] | None = None  # (theta, scaling) of sliding layers' RoPE (Gemma 3)

    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

    @property
    def rotary_dim(self) -> int:
        """How many channels of each head RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer (None: it sees the whole causal context)."""
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    def rope_of(self, layer: int) -> str | None:
        """Which RoPE a layer uses: "global", "local" (Gemma 3's sliding layers) or None (no rotation)."""
        if self.rope_layers and not self.rope_layers[layer]:
            return None
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return "local" if self.rope_local is not None and sliding else "global"

    @classmethod
    def from_hf(cls, d: Any) -> "ModelConfig":
        """The config of a config.json dictionary, checked: every field the model reads must have the right
        type and range, so a bad config.json is one line that names the field, never a traceback at the
        first forward pass or, worse, a model that runs with settings its checkpoint was not trained with."""
        if not isinstance(d, dict):
            raise UserError(f"not a JSON object of settings: {_show(d)}")
        mt = d.get("model_type")
        if isinstance(mt, str) and mt in REFUSED:
            raise UserError(f"model_type {mt!r} is not supported: {REFUSED[mt]}")
        if not isinstance(mt, str) or mt not in ARCHITECTURES:
            raise UserError(f"unsupported model_type {mt!r}: nanolisa supports {', '.join(ARCHITECTURES)}")
        fields = _gpt2_fields(d) if mt == "gpt2" else _decoder_fields(d, mt)
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


# Per model_type: the defaults its transformers config class gives keys that config.json may leave out, where
# they differ from LlamaConfig's, and the key that names its MLP activation.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=128),
    "gemma2": dict(head_dim=256, tie_word_embeddings=True, act_key="hidden_activation", act="gelu_pytorch_tanh"),
    "gemma3_text": dict(head_dim=256, tie_word_embeddings=True, act_key="hidden_activation",
                        act="gelu_pytorch_tanh", rope_theta=1e6),
    "phi3": dict(rms_norm_eps=1e-5),
    "olmo2": dict(rms_norm_eps=1e-5),
    "smollm3": dict(tie_word_embeddings=True, rope_theta=2e6),
}
ATTENTION_BIAS = ("llama", "qwen3", "gemma2", "gemma3_text", "olmo2", "smollm3")  # read attention_bias
MLP_BIAS = ("llama", "smollm3")  # read mlp_bias


def _llama_fields(d: dict, model_type: str) -> dict[str, Any]:
    """The fields every family of the Llama-style decoder has, with the family's defaults."""
    dflt = _DEFAULTS.get(model_type, {})
    C, nh = _get(d, "hidden_size", "size"), _get(d, "num_attention_heads", "size")
    nkv = _get(d, "num_key_value_heads", "size", nh, nullable=True)
    if nh % nkv:
        raise UserError(f"num_attention_heads ({nh}) must be a multiple of num_key_value_heads ({nkv})")
    head_dim = _get(d, "head_dim", "size", dflt.get("head_dim"), nullable=True)
    if head_dim is None:
        if C % nh:
            raise UserError(f"hidden_size ({C}) must be divisible by num_attention_heads ({nh}), "
                            f"or config.json must give head_dim")
        head_dim = C // nh
    return dict(vocab_size=_get(d, "vocab_size", "size"), hidden_size=C,
                num_hidden_layers=_get(d, "num_hidden_layers", "size"), num_attention_heads=nh,
                num_key_value_heads=nkv, head_dim=head_dim, intermediate_size=_get(d, "intermediate_size", "size"),
                max_position_embeddings=_get(d, "max_position_embeddings", "size", 2048),
                norm_eps=_get(d, "rms_norm_eps", "number", dflt.get("rms_norm_eps", 1e-6)),
                hidden_act=_activation(d, dflt.get("act_key", "hidden_act"), dflt.get("act", "silu")),
                tie_word_embeddings=_get(d, "tie_word_embeddings", "bool", dflt.get("tie_word_embeddings", False)),
                attention_bias=model_type in ATTENTION_BIAS and _get(d, "attention_bias", "bool", False),
                qkv_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases
                mlp_bias=model_type in MLP_BIAS and _get(d, "mlp_bias", "bool", False))


def _decoder_fields(d: dict, model_type: str) -> dict[str, Any]:
    """Every field of a Llama-style decoder: the shared ones, the family's block, attention layout and RoPE."""
    f = _llama_fields(d, model_type)
    f.update(_block_fields(d, model_type))
    f.update(_attention_layout(d, model_type, f["num_hidden_layers"]))
    f.update(_rope_fields(d, model_type, f))
    return f


def _optional(d: dict, key: str, default: float | None) -> float | None:
    """A number that null turns off (Gemma's soft-capping): missing -> default, null -> None."""
    return None if key in d and d[key] is None else _get(d, key, "number", default)


def _block_fields(d: dict, mt: str) -> dict[str, Any]:
    """What the family's block does differently from Llama's (model.py's table)."""
    if mt in ("gemma2", "gemma3_text"):
        if _get(d, "use_bidirectional_attention", "bool", False, nullable=True):
            raise UserError("use_bidirectional_attention true (an embedding model, not a causal LM) is not "
                            "supported")
        f = dict(norm_placement="sandwich", norm_offset=1.0, norm_weight_fp32=True, embed_scale=True,
                 query_scale=_get(d, "query_pre_attn_scalar", "number", 256) ** -0.5,
                 final_softcap=_optional(d, "final_logit_softcapping", 30.0 if mt == "gemma2" else None))
        if mt == "gemma2":  # (Gemma 3's modeling file ignores attn_logit_softcapping: q/k norm replaces it)
            f["attn_softcap"] = _optional(d, "attn_logit_softcapping", 50.0)
        else:
            f["qk_norm"] = "head"
        return f
    if mt == "olmo2":
        return dict(norm_placement="post", norm_weight_fp32=True, qk_norm="projection", rope_fp32=True)
    if mt == "qwen3":
        return dict(qk_norm="head")
    if mt == "phi3":
        return dict(fused_projections=True)
    return {}


def _attention_layout(d: dict, mt: str, L: int) -> dict[str, Any]:
    """sliding_window and which layers use it (layer_types), as each family's config class derives them
    when config.json does not list layer_types (transformers 5 writes the list)."""
    if mt in ("llama", "olmo2"):  # no sliding windows in these families' modeling files
        return dict(sliding_window=None, layer_types=(), rope_layers=())
    window = _get(d, "sliding_window", "size", 4096 if mt.startswith("gemma") else None, nullable=True)
    if mt in ("qwen2", "qwen3") and not _get(d, "use_sliding_window", "bool", False):
        window = None  # Qwen ignores sliding_window unless use_sliding_window
    rope_layers = ()
    if mt == "smollm3":
        every = _get(d, "no_rope_layer_interval", "size", 4)
        flags = d.get("no_rope_layers")  # 1: the layer uses RoPE, 0: it does not (SmolLM3's naming)
        if flags is None:
            flags = [int((i + 1) % every != 0) for i in range(L)]
        if not (isinstance(flags, list) and len(flags) == L and all(x in (0, 1) for x in flags)):
            raise UserError(f"no_rope_layers must be a list of {L} zeros and ones, got {_show(flags)}")
        rope_layers = tuple(bool(x) for x in flags)
    if mt in ("mistral", "phi3"):
        types = ["sliding_attention"] * L  # every layer; Mistral ignores layer_types
    elif d.get("layer_types") is not None:
        types = d["layer_types"]
        if not (isinstance(types, list) and len(types) == L and all(t in LAYER_TYPES for t in types)):
            raise UserError(f"layer_types must be a list of {L} of {', '.join(map(repr, LAYER_TYPES))}, "
                            f"got {_show(types)}")
    elif mt in ("qwen2", "qwen3"):
        first = _get(d, "max_window_layers", "size", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(L)]
    elif mt.startswith("gemma"):
        every = 2 if mt == "gemma2" else _get(d, "sliding_window_pattern", "size", 6)
        types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(L)]
    else:  # smollm3: the layers without RoPE slide, when use_sliding_window says so
        on = _get(d, "use_sliding_window", "bool", False)
        types = ["sliding_attention" if on and not rope_layers[i] else "full_attention" for i in range(L)]
    return dict(sliding_window=window, layer_types=tuple(types), rope_layers=rope_layers)


def _rope_fields(d: dict, mt: str, f: dict) -> dict[str, Any]:
    """rope_theta, rope_scaling, partial_rotary_factor and, for Gemma 3, rope_local, from the keys released
    checkpoints carry (rope_theta, rope_scaling, rope_local_base_freq, partial_rotary_factor) or from
    transformers 5's rope_parameters (one dict, or one per layer type)."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise UserError(f"{key} must be an object like {{\"rope_type\": \"linear\", \"factor\": 2.0}}, "
                            f"got {_show(d[key])}")
    params = d.get("rope_parameters") or {}
    theta_default = _DEFAULTS.get(mt, {}).get("rope_theta", 10000.0)
    factor = 1.0
    if mt == "phi3":
        factor = _get(params, "partial_rotary_factor", "number", None, where="rope_parameters.")
        if factor is None:
            factor = _get(d, "partial_rotary_factor", "number", 1.0, nullable=True)
        if factor > 1:
            raise UserError(f"partial_rotary_factor must be at most 1, got {factor:g}")
    rotary = int(f["head_dim"] * factor)
    if rotary % 2 or rotary == 0:
        raise UserError(f"head size {rotary} is odd: rotary embeddings rotate pairs of channels" if factor == 1
                        else f"partial_rotary_factor {factor:g} of head size {f['head_dim']} rotates {rotary} "
                             f"channels: rotary embeddings rotate pairs of channels")
    out: dict[str, Any] = dict(partial_rotary_factor=factor)
    orig = d.get("original_max_position_embeddings") if mt == "phi3" else None  # Phi-3 keeps it outside
    if mt == "gemma3_text" and any(k in params for k in LAYER_TYPES):  # transformers 5: per layer type
        glob = params.get("full_attention") or {}
        loc = params.get("sliding_attention") or {}
        out["rope_theta"], out["rope_scaling"] = _rope(
            {}, glob, "rope_parameters.full_attention.", theta_default, rotary, f, None, mt)
        out["rope_local"] = _rope({}, loc, "rope_parameters.sliding_attention.", 10000.0, rotary, f, None, mt)
        return out
    out["rope_theta"], out["rope_scaling"] = _rope(d, params, "rope_parameters.", theta_default, rotary, f, orig, mt)
    if mt == "gemma3_text":  # released checkpoints: rope_theta/rope_scaling are the global layers'
        out["rope_local"] = (_get(d, "rope_local_base_freq", "number", 10000.0, nullable=True), None)
    return out


def _rope(d: dict, params: dict, where: str, theta_default: float, rotary: int, f: dict, orig: Any,
          mt: str) -> tuple[float, dict | None]:
    """(theta, scaling) from rope_theta + rope_scaling in d (classic) or from params (transformers 5's
    rope_parameters), with the fields each scaling type needs."""
    key = "rope_scaling" if d.get("rope_scaling") else where.rstrip(".")
    scaling = {k: v for k, v in (d.get("rope_scaling") or params).items() if k != "rope_theta"}
    theta = _get(d, "rope_theta", "number", None, nullable=True)
    if theta is None:
        theta = _get(params, "rope_theta", "number", theta_default, nullable=True, where=where)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if mt == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's older names for longrope (as transformers maps)
        rope_type = "longrope"
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES or (rope_type == "longrope" and mt != "phi3"):
        raise UserError(f"unsupported rope scaling {rope_type!r}: nanolisa supports "
                        f"{', '.join(t for t in ROPE_TYPES if t != 'longrope')} (and longrope for phi3)")
    if rope_type == "default":
        return theta, None
    where = key + "."
    if rope_type == "longrope":
        return theta, _longrope(scaling, where, rotary, f, orig)
    _get(scaling, "factor", "number", where=where)
    if rope_type == "dynamic" and rotary <= 2:
        raise UserError(f"dynamic rope scaling needs a head size above 2, got {rotary}")
    if rope_type == "llama3":
        lo = _get(scaling, "low_freq_factor", "number", where=where)
        hi = _get(scaling, "high_freq_factor", "number", where=where)
        _get(scaling, "original_max_position_embeddings", "size", where=where)
        if hi <= lo:
            raise UserError(f"{where}high_freq_factor ({hi:g}) must be greater than low_freq_factor ({lo:g})")
    return theta, {**scaling, "rope_type": rope_type}


def _longrope(s: dict, where: str, rotary: int, f: dict, orig: Any) -> dict:
    """LongRoPE (Ding et al. 2024, arXiv 2402.13753) as Phi-3 uses it: per-frequency rescaling factors, short
    ones up to the pretraining length original_max_position_embeddings, long ones past it, and cos/sin
    scaled by attention_factor (default sqrt(1 + ln(factor) / ln(original)), factor = max / original)."""
    for name in ("short_factor", "long_factor"):
        v = s.get(name)
        if not (isinstance(v, list) and len(v) == rotary // 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v)):
            raise UserError(f"{where}{name} must be a list of {rotary // 2} positive numbers, got {_show(v)}")
    if orig is None:
        orig = s.get("original_max_position_embeddings", f["max_position_embeddings"])
    orig = _get({"original_max_position_embeddings": orig}, "original_max_position_embeddings", "size")
    factor = _get(s, "factor", "number", f["max_position_embeddings"] / orig, nullable=True, where=where)
    attn = _get(s, "attention_factor", "number", None, nullable=True, where=where)
    if attn is None:
        attn = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    return dict(rope_type="longrope", short_factor=[float(x) for x in s["short_factor"]],
                long_factor=[float(x) for x in s["long_factor"]], original_max_position_embeddings=orig,
                attention_factor=attn)


def read_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    d = read_json(path)
    try:
        return ModelConfig.from_hf(d)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
