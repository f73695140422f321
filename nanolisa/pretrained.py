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

import dataclasses
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from nanolisa.config import CONFIG_DTYPES, ModelConfig, read_config, to_dtype
from nanolisa.errors import UserError
from nanolisa.files import install_dir, read_json, staging_dir, write_json
from nanolisa.model import CausalLM, build_model
from nanolisa.parallel import full_tensor, is_sharded
from nanolisa.presets import PRESETS, load_preset
from nanolisa.runtime import available_memory, gigabytes
from nanolisa.tokenizer import TOKENIZER_FILES, load_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # GPT-2
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")
SHARD_BYTES = 5 * 2**30  # shard past 5 GiB, as transformers does


# ----------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Stored:
    """One tensor of a checkpoint, not read yet: its shape, and how to read it whole or a range along one
    dimension (safetensors reads just those bytes, so a rank can read only its shard's rows)."""
    name: str
    shape: tuple[int, ...]
    read_range: Callable[[int, int, int], torch.Tensor]  # (dim, start, stop) -> that part of the tensor

    def read(self, dim: int = 0, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its [start:stop] along `dim`."""
        return self.read_range(dim, start, self.shape[dim] if stop is None else stop) if self.shape else \
            self.read_range(0, 0, 0)


# safetensors' names of the dtypes a checkpoint holds.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def safetensors_header(path: str) -> tuple[dict, int]:
    """(the header of a safetensors file, where its data starts), checked against the file's size: a
    truncated or damaged file (a full disk, a killed copy) is one UserError naming it.
    Format: 8-byte little-endian header length, the JSON header, then the tensors' bytes at their offsets."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise UserError(f"{path}: unreadable safetensors file: it is truncated")
            header = json.loads(f.read(n))
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
        raise UserError(f"{path}: unreadable safetensors file: it has no readable header") from None
    if size != 8 + n + end:
        raise UserError(f"{path}: unreadable safetensors file: it is {size} bytes, its header says {8 + n + end}; "
                        f"is it truncated?")
    return header, 8 + n


def _read_rows(path: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...], a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of the tensor stored row-major at byte `offset` of `path`: only those bytes are read,
    with plain reads into the tensor's memory (no memory map that would keep the file's pages mapped)."""
    row = math.prod(shape[1:]) if shape else 1
    out = torch.empty(((b - a) if shape else 1) * row, dtype=dtype, device="cpu")  # (whatever the default device)
    buf = memoryview(out.view(torch.uint8).numpy())
    with open(path, "rb") as f:
        f.seek(offset + a * row * dtype.itemsize)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise UserError(f"{path}: ends before its tensors do; is it truncated?")
            done += n
    return out.view((b - a, *shape[1:]) if shape else ())


def checkpoint_tensors(model_dir: str) -> list[Stored]:
    """Every tensor of a Hugging Face model directory, unread. Each file is checked first (present, header
    readable, as long as the header says), so that bad files are one clear error before anything is read."""
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
        return [Stored(name, tuple(t.shape), lambda dim, a, b, t=t: t.narrow(dim, a, b - a) if t.dim() else t)
                for name, t in sd.items()]
    else:
        raise UserError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    out = []
    for fname in files:
        path = os.path.join(model_dir, fname)
        if not os.path.isfile(path):
            raise UserError(f"{path}: shard listed in the index is missing")
        header, data = safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = STORED_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise UserError(f"{path}: tensor {name} has dtype {info.get('dtype')}, which nanolisa does not read")
            shape, offset = tuple(info["shape"]), data + info["data_offsets"][0]

            def read_range(dim: int, a: int, b: int, path=path, offset=offset, dtype=dtype, shape=shape):
                if dim == 0:
                    return _read_rows(path, offset, dtype, shape, a, b)
                return _read_rows(path, offset, dtype, shape, 0, shape[0]).narrow(dim, a, b - a)
            out.append(Stored(name, shape, read_range))
    return out


def _from_hf_name(name: str, cfg: ModelConfig) -> str | None:
    """Checkpoint key -> nanolisa parameter name (None: a buffer to skip)."""
    if cfg.is_gpt2:
        if name.endswith(GPT2_BUFFERS):
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
    return name


def check_fits_in_memory(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, path: str,
                         share: float = 1.0) -> None:
    """The weights a config.json implies, at the dtype they are loaded in, against the memory the device has
    free: one line before anything is built (num_hidden_layers 1000000 built for minutes, then crashed).
    Counted from a 1- and a 2-block model on the meta device, so every family counts its own way. `share`:
    the fraction of the weights this device holds (1 / world size for FSDP2 shards on GPUs)."""
    with torch.device("meta"):
        one, two = (sum(p.numel() for p in build_model(dataclasses.replace(cfg, num_hidden_layers=n)).parameters())
                    for n in (1, 2))
    n_params = one + (two - one) * (cfg.num_hidden_layers - 1)
    need, have = math.ceil(n_params * dtype.itemsize * share), available_memory(device)
    if need > have:
        raise UserError(f"{path}/config.json: its model has {n_params / 1e9:.3g}B parameters ({cfg.num_hidden_layers} "
                        f"layers of width {cfg.hidden_size}), {gigabytes(need)} in "
                        f"{str(dtype).removeprefix('torch.')}, more than the {gigabytes(have)} of memory free on "
                        f"{device.type}")


def match_checkpoint(path: str, model: CausalLM) -> dict[str, tuple[Stored, bool]]:
    """{parameter name: (its checkpoint tensor, whether that is stored transposed)} for every parameter of
    the model that the checkpoint holds: the checkpoint must hold every parameter of the plain model, each
    in the shape config.json implies, and nothing else (one error line naming what does not match).
    Parameters the checkpoint does not have (LoRA adapters added to the model) are left out."""
    cfg = model.config
    params = dict(model.named_parameters())  # tied head appears once, under the embedding's name
    plain = {n for n in params if ".lora_" not in n}  # LoRA keeps the base weight under its own name
    found: dict[str, tuple[Stored, bool]] = {}
    unexpected: list[str] = []
    for stored in checkpoint_tensors(path):
        name = _from_hf_name(stored.name, cfg)
        if name is None:
            continue
        if name not in plain:
            if not (name == "lm_head.weight" and cfg.tie_word_embeddings):  # tied: the copy is redundant
                unexpected.append(stored.name)
            continue
        conv1d = cfg.is_gpt2 and name.endswith(CONV1D) and len(stored.shape) == 2
        shape = stored.shape[::-1] if conv1d else stored.shape
        want = tuple(params[name].shape)
        if shape != want:
            raise UserError(f"{path}: tensor {stored.name} has shape {shape}, config.json implies {want}")
        found[name] = (stored, conv1d)
    missing = sorted(plain - set(found))
    if missing or unexpected:
        what = (f"missing {len(missing)} tensor(s) e.g. {missing[:3]}" if missing else "") + \
               ("; " if missing and unexpected else "") + \
               (f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}" if unexpected else "")
        raise UserError(f"{path}: weights do not match config.json: {what}")
    return found


def load_model(path: str, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> CausalLM:
    """The model only, from a Hugging Face directory. dtype None keeps the checkpoint's own dtype."""
    cfg = read_config(path)
    dtype = to_dtype(dtype) or CONFIG_DTYPES.get(cfg.dtype, torch.float32)
    device = torch.device(device or "cpu")
    check_fits_in_memory(cfg, dtype, device, path)
    with torch.device("meta"):
        model = build_model(cfg)
    for name, (stored, transposed) in match_checkpoint(path, model).items():
        t = stored.read()
        t = t.t() if transposed else t
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = torch.nn.Parameter(t.to(device=device, dtype=dtype).contiguous())
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
    tokenizer = load_tokenizer(path)  # first: a bad tokenizer file is one line before gigabytes are read
    model = load_model(path, dtype, device)
    tokenizer.check_fits(model.config.vocab_size)
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class OutTensor:
    """One tensor of the checkpoint to write: its name, shape and dtype there, and how to read it."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]  # the tensor in the checkpoint's layout, on the CPU
    sharded: bool  # read() gathers FSDP2 shards: a collective every rank must join

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def hf_tensors(model: CausalLM, dtype: torch.dtype | None = None) -> list[OutTensor]:
    """The model's tensors under the checkpoint's names and layout (tied head dropped, Conv1D transposed),
    read one at a time when written, so a save never holds a second copy of the whole model."""
    cfg = model.config
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        conv1d = cfg.is_gpt2 and name.endswith(CONV1D)
        shape = tuple(t.shape[::-1]) if conv1d else tuple(t.shape)
        out_dtype = dtype or t.dtype

        def read(t=t, conv1d=conv1d, out_dtype=out_dtype) -> torch.Tensor:
            full = full_tensor(t.detach())
            return (full.t() if conv1d else full).to(device="cpu", dtype=out_dtype).contiguous()
        out.append(OutTensor(name, shape, out_dtype, read, is_sharded(t)))
    return out


def write_safetensors(path: str, tensors: list[OutTensor], metadata: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, byte offsets) is
    known before any tensor is read, so only one tensor is in memory at a time.
    Format: 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes), the data."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            data = t.read()
            assert tuple(data.shape) == t.shape and data.dtype == t.dtype, t.name
            f.write(data.reshape(-1).view(torch.uint8).numpy().data)


def _write_weights(tensors: list[OutTensor], out_dir: str, max_shard_bytes: int) -> None:
    """model.safetensors, or shards of at most max_shard_bytes plus model.safetensors.index.json."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0], meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, fname), shard, meta)
        weight_map.update({t.name: fname for t in shard})
    write_json(os.path.join(out_dir, "model.safetensors.index.json"),
               {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map})


def _earlier_weights(out_dir: str) -> set[str]:
    """The weight files of an earlier save in out_dir: model.safetensors, and the index with the shards it
    lists. A new save removes those it does not replace (fewer shards, say), so no reader mixes two saves;
    any other file in out_dir is the user's and stays."""
    names = {"model.safetensors"}
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        names.add("model.safetensors.index.json")
        try:
            names |= set(read_json(index)["weight_map"].values())
        except (UserError, KeyError, TypeError, AttributeError):
            pass
    return names


def stored_dtype(model: CausalLM) -> torch.dtype:
    """The dtype the model's checkpoint declares in its config.json (fp32 when it declares none), whatever
    dtype the model was loaded in: what a fine-tune of it is saved in by default."""
    hf = model.config.hf
    return CONFIG_DTYPES.get(hf.get("dtype") or hf.get("torch_dtype") or "float32", torch.float32)


def save_pretrained(model: CausalLM, tokenizer, out_dir: str, dtype: str | torch.dtype | None = None,
                    max_shard_bytes: int = SHARD_BYTES, writer: bool = True) -> None:
    """Write model (and tokenizer, if given) as a Hugging Face directory that transformers loads as-is.

    Under FSDP2 every rank calls this: the full tensors are gathered from the shards one at a time, and
    only the `writer` (rank 0) writes them."""
    dtype = to_dtype(dtype) or model.lm_head.weight.dtype
    tensors = hf_tensors(model, dtype)
    if not writer:
        for t in tensors:
            if t.sharded:
                t.read()  # take part in the gather; rank 0 writes
        return
    with staging_dir(out_dir) as tmp:
        _write_weights(tensors, tmp, max_shard_bytes)
        cfg = model.config.to_hf(str(dtype).removeprefix("torch."))
        gen = getattr(model, "generation_config", None) or {
            k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
        stops = list(getattr(tokenizer, "stop_token_ids", None) or [])
        if len(stops) > 1 and "eos_token_id" not in (getattr(model, "generation_config", None) or {}):
            gen["eos_token_id"] = stops  # so generate() elsewhere also stops at end-of-turn (<|im_end|>, ...)
        if tokenizer is not None:
            tokenizer.save(tmp)  # the base's tokenizer files, copied (its generation_config.json is rewritten next)
        write_json(os.path.join(tmp, "generation_config.json"), gen)
        write_json(os.path.join(tmp, "config.json"), cfg)
        # an earlier save's weight files (and tokenizer files, when a tokenizer is written) do not survive
        stale = (_earlier_weights(out_dir) if os.path.isdir(out_dir) else set()) | \
            (set(TOKENIZER_FILES) if tokenizer is not None else set())
        install_dir(tmp, out_dir, stale=stale.__contains__, last="config.json")
