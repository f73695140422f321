"""Hugging Face model directories in and out: `load_pretrained` and `save_pretrained`.

A Hugging Face model directory holds config.json, the weights (model.safetensors, or shards listed in
model.safetensors.index.json, or a legacy pytorch_model.bin) and the tokenizer files. Because nanolisa's
module names mirror the checkpoint's, loading is a key copy plus a short, explicit list of exceptions:

  1. GPT-2 stores its projections as Conv1D, weight (in, out): transposed to nn.Linear's (out, in).
  2. Old GPT-2 checkpoints drop the "transformer." prefix and carry the attention mask as a buffer
     (`attn.bias`, `attn.masked_bias`): the prefix is restored and the buffers skipped.
  3. With tied embeddings there is no lm_head.weight (or it equals the embedding): the head shares the
     embedding Parameter.

The model is built on the meta device (no memory) and each tensor is read straight into the target dtype
and device, so loading never holds a second full-size copy of the weights.

Saving writes the same layout back, to a temporary directory first, so a crash never leaves half a
checkpoint behind.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanolisa.config import CONFIG_DTYPES, ModelConfig, read_config, to_dtype
from nanolisa.errors import UserError
from nanolisa.files import install_dir, read_json, staging_dir, write_json
from nanolisa.model import CausalLM, build_model
from nanolisa.presets import PRESETS, load_preset
from nanolisa.tokenizer import load_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")
SHARD_BYTES = 5 * 2**30  # shard past 5 GiB, as transformers does


# ----------------------------------------------------------------------------------------------------------
# Reading


def _hf_tensors(model_dir: str) -> Iterator[tuple[str, Any]]:
    """Yield (name, loader) for every tensor in the directory; loader() reads that one tensor."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    binfile = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(index):
        try:
            files = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise UserError(f"{index}: not a safetensors index (no weight_map)") from None
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    elif os.path.isfile(binfile):
        # Legacy pickle: weights_only=True refuses anything but tensors, so no code from the file runs.
        try:
            sd = torch.load(binfile, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"{binfile}: unreadable ({str(e).splitlines()[0]})") from None
        for name, t in sd.items():
            yield name, (lambda t=t: t)
        return
    else:
        raise UserError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for fname in files:
        path = os.path.join(model_dir, fname)
        if not os.path.isfile(path):
            raise UserError(f"{path}: shard listed in the index is missing")
        try:
            f = safe_open(path, framework="pt")
            names = list(f.keys())
        except Exception as e:  # safetensors reports truncation and bad headers as its own errors
            raise UserError(f"{path}: unreadable safetensors file ({e}); is it truncated?") from None

        def read(name: str, f=f, path=path) -> torch.Tensor:
            try:
                return f.get_tensor(name)
            except Exception as e:
                raise UserError(f"{path}: cannot read tensor {name} ({e}); is the file truncated?") from None
        for name in names:
            yield name, (lambda name=name, read=read: read(name))


def _from_hf_name(name: str, cfg: ModelConfig) -> str | None:
    """Checkpoint key -> nanolisa parameter name (None: a buffer to skip)."""
    if cfg.is_gpt2:
        if name.endswith(GPT2_BUFFERS):
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
    return name


def load_model(path: str, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> CausalLM:
    """The model only, from a Hugging Face directory. dtype None keeps the checkpoint's own dtype."""
    cfg = read_config(path)
    dtype = to_dtype(dtype) or CONFIG_DTYPES.get(cfg.dtype, torch.float32)
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = build_model(cfg)
    params = dict(model.named_parameters())  # tied head appears once, under the embedding's name
    loaded: set[str] = set()
    unexpected: list[str] = []
    for hf_name, read in _hf_tensors(path):
        name = _from_hf_name(hf_name, cfg)
        if name is None:
            continue
        if name not in params:
            if not (name == "lm_head.weight" and cfg.tie_word_embeddings):  # tied: the copy is redundant
                unexpected.append(hf_name)
            continue
        t = read()
        if cfg.is_gpt2 and name.endswith(CONV1D) and t.dim() == 2:
            t = t.t()
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{path}: tensor {hf_name} has shape {tuple(t.shape)}, config.json implies {tuple(p.shape)}")
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = torch.nn.Parameter(t.to(device=device, dtype=dtype).contiguous())
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing or unexpected:
        what = (f"missing {len(missing)} tensor(s) e.g. {missing[:3]}" if missing else "") + \
               ("; " if missing and unexpected else "") + \
               (f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}" if unexpected else "")
        raise UserError(f"{path}: weights do not match config.json: {what}")
    model.tie_weights()
    model.config.dtype = str(dtype).removeprefix("torch.")
    model.generation_config = read_generation_config(path)
    return model


def read_generation_config(model_dir: str) -> dict | None:
    """generation_config.json (None without one), checked now: it is written back with the fine-tuned
    model, so a bad one would otherwise only fail at the final save, after the whole run."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return None
    gen = read_json(path)
    if not isinstance(gen, dict):
        raise UserError(f"{path}: not a JSON object of generation settings: {json.dumps(gen)[:60]}")
    eos = gen.get("eos_token_id")  # the one setting nanolisa reads from it: where generation stops
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise UserError(f"{path}: eos_token_id must be a token id or a list of them, got {json.dumps(eos)[:60]}")
    return gen


def load_pretrained(path: str, dtype: str | torch.dtype | None = None,
                    device: str | torch.device | None = None):
    """(model, tokenizer) from a Hugging Face model directory or a built-in preset name ("tiny")."""
    if path in PRESETS and not os.path.isdir(path):
        return load_preset(path, dtype=dtype, device=device)
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such model directory (or preset: {', '.join(PRESETS)})")
    return load_model(path, dtype, device), load_tokenizer(path)


# ----------------------------------------------------------------------------------------------------------
# Writing


def hf_state_dict(model: CausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under the checkpoint's names and layout (tied head dropped, Conv1D transposed)."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if cfg.is_gpt2 and name.endswith(CONV1D):
            t = t.t()
        out[name] = t.detach().to(dtype or t.dtype).contiguous()
    return out


def _write_weights(sd: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    write_json(os.path.join(out_dir, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


def _is_weight_file(name: str) -> bool:
    """Weight files of an earlier save, removed when a new save does not write them (fewer shards, say)."""
    return name.startswith("model") and name.endswith((".safetensors", ".json")) or name == "pytorch_model.bin"


def save_pretrained(model: CausalLM, tokenizer, out_dir: str, dtype: str | torch.dtype | None = None,
                    max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write model (and tokenizer, if given) as a Hugging Face directory that transformers loads as-is."""
    dtype = to_dtype(dtype) or model.lm_head.weight.dtype
    sd = hf_state_dict(model, dtype)
    with staging_dir(out_dir) as tmp:
        _write_weights(sd, tmp, max_shard_bytes)
        cfg = model.config.to_hf(str(dtype).removeprefix("torch."))
        gen = getattr(model, "generation_config", None) or {
            k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        stops = list(getattr(tokenizer, "stop_token_ids", None) or [])
        if len(stops) > 1 and "eos_token_id" not in (getattr(model, "generation_config", None) or {}):
            gen["eos_token_id"] = stops  # so generate() elsewhere also stops at end-of-turn (<|im_end|>, ...)
        write_json(os.path.join(tmp, "generation_config.json"), gen)
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_json(os.path.join(tmp, "config.json"), cfg)
        install_dir(tmp, out_dir, stale=_is_weight_file, last="config.json")
