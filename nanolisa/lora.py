"""LoRA and DoRA adapters, saved and loaded in the PEFT format.

LoRA (Hu et al. 2021, arXiv 2106.09685) freezes a pretrained weight W (out, in) and learns a low-rank update:

    y = x W^T + b + s * B(A(dropout(x))),     A: (r, in), B: (out, r), s = alpha / r

B starts at zero, so training starts from the pretrained model exactly. rsLoRA (Kalajdzievski 2023,
arXiv 2312.03732) uses s = alpha / sqrt(r) so that the update's size does not shrink as the rank grows.

DoRA (Liu et al. 2024, arXiv 2402.09353) splits the weight into a direction and a magnitude. The direction
is the LoRA-updated weight W + s*B@A; each output row is rescaled to a learned length m (out,):

    y = m / ||W + s*B@A||_row  *  (x W^T + s * B(A(x)))  +  b

and, as the paper suggests (section 4.3) and peft does, the norm is treated as a constant (no gradient).

`LoRALinear` keeps the frozen base `weight` and `bias` on itself, so its state-dict keys are those of the
plain nn.Linear it replaces plus `lora_A.weight`, `lora_B.weight` (and `lora_magnitude_vector` for DoRA):
exactly peft's names once peft's "base_model.model." prefix is added. That is why the PEFT file format is a
key rename here, and why an adapter written by nanolisa loads in `peft.PeftModel.from_pretrained` and one
written by peft loads in nanolisa. GPT-2's Conv1D layers need no special case for the adapters: peft's
lora_A / lora_B are (r, in) / (out, r) for Conv1D too; only the config says `fan_in_fan_out: true`.

    names = apply_lora(model, r=8, alpha=16, targets="all-linear")   # wrap the Linear layers
    mark_only_lora_trainable(model, modules_to_save=["lm_head"])     # freeze everything else
    ...train...
    save_adapter(model, "out/adapter", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    load_adapter(fresh_model, "out/adapter"); merge_lora(fresh_model)  # a plain model again
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from nanolisa.activation_memory import frozen_linear
from nanolisa.errors import UserError
from nanolisa.files import install_dir, read_json, staging_dir, write_json
from nanolisa.model import unwrap
from nanolisa.parallel import full_tensor
from nanolisa.pretrained import OutTensor, write_safetensors
from nanolisa.tokenizer import TOKENIZER_FILES

Tensor = torch.Tensor

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the model: every key starts so
LORA_PARAMS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
# Name segments that wrappers insert (torch.compile, activation checkpointing, FSDP1, DDP): never saved.
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc")  # GPT-2 layers Hugging Face stores as Conv1D, weight (in, out)


def clean_name(name: str) -> str:
    """A module/parameter name without wrapper segments: the name the checkpoint uses."""
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":  # DistributedDataParallel
        parts = parts[1:]
    return ".".join(parts)


# ----------------------------------------------------------------------------------------------------------
# The layer


def init_lora_A(a: Tensor) -> Tensor:
    """LoRA's A, initialised in place as peft (and the LoRA paper) do: like nn.Linear's default weight.
    Drawn on the CPU, whatever the model's device, so a seed gives the same adapters on every device, and
    a sharded model (nanolisa/sharded_load.py) can make the very same matrices."""
    return nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (LoRA), optionally weight-decomposed (DoRA)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        if r <= 0:
            raise UserError(f"LoRA rank must be positive, got r={r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        # The base layer's own Parameters, not copies: tied weights and optimizer references stay valid.
        self.register_parameter("weight", base.weight)  # (out, in)
        self.register_parameter("bias", base.bias)  # (out,) or None
        self.r, self.alpha, self.rslora, self.dora = r, alpha, rslora, dora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        # Built on the meta device, then given their values: no default initialisation drawn only to be
        # overwritten (nor a random number used by one). A is drawn on the CPU whatever the device, so every
        # device and every way of loading (nanolisa/sharded_load.py) draws the same A; B = 0, so the update
        # starts at 0.
        with torch.device("meta"):
            self.lora_A = nn.Linear(self.in_features, r, bias=False)  # (r, in)
            self.lora_B = nn.Linear(r, self.out_features, bias=False)  # (out, r)
        self.lora_A.weight = nn.Parameter(init_lora_A(torch.empty(r, self.in_features)).to(**factory))
        self.lora_B.weight = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        # DoRA's magnitude starts at the row norms of W (B = 0), so the layer starts as the base layer.
        magnitude = nn.Parameter(self.weight_norm()) if dora else None
        self.register_parameter("lora_magnitude_vector", magnitude)  # (out,)
        self.merged = False

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def delta_weight(self) -> Tensor:
        """s * B @ A, the LoRA update of W, (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def weight_norm(self) -> Tensor:
        """||W + s*B@A|| of each output row, (out,). No gradient: DoRA section 4.3 treats it as a constant."""
        w = self.weight.to(self.lora_A.weight.dtype) + self.delta_weight()
        return torch.linalg.norm(w, dim=1).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:  # x (B, T, in) -> (B, T, out)
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # The frozen path, x W^T + b: under autocast it keeps the fp32 W for backward, not a bf16 copy.
        y = frozen_linear(x, self.weight, self.bias)  # (B, T, out)
        xd = self.lora_dropout(x).to(self.lora_A.weight.dtype)  # x itself when lora_dropout is 0 (Identity)
        # s applied to the (B, T, r) tensor, not to B's (B, T, out) output: one (B, T, out) temporary fewer
        lora = self.lora_B(self.lora_A(xd) * self.scaling)  # (B, T, out)
        if self.lora_magnitude_vector is None:
            return y + lora.to(y.dtype)
        # DoRA: y = m/||W + sBA|| * (x W^T + s BAx) + b, written (as peft does) as a correction to y.
        # With dropout active, peft rescales the dropped-out input's base output; we follow it exactly.
        m_over_n = self.lora_magnitude_vector / self.weight_norm()  # (out,)
        if self.training and self.dropout > 0:
            base = F.linear(xd, self.weight.to(xd.dtype))
        else:
            base = y if self.bias is None else y - self.bias
        return y + ((m_over_n - 1) * base + m_over_n * lora).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into `weight` (computed in fp32): forward is then a plain Linear."""
        if self.merged:
            return
        w = self.weight.float() + self.delta_weight().float()  # (out, in)
        if self.lora_magnitude_vector is not None:
            self._merge_norm = torch.linalg.norm(w, dim=1)  # kept to undo the merge exactly
            w = (self.lora_magnitude_vector.float() / self._merge_norm)[:, None] * w
        self.weight.copy_(w.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: recover the base weight (up to rounding)."""
        if not self.merged:
            return
        w = self.weight.float()
        if self.lora_magnitude_vector is not None:
            w = w / (self.lora_magnitude_vector.float() / self._merge_norm)[:, None]
        self.weight.copy_((w - self.delta_weight().float()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, rslora={self.rslora}, dora={self.dora}, merged={self.merged}")


# ----------------------------------------------------------------------------------------------------------
# Injecting adapters into a model


@dataclass
class LoRAConfig:
    """The settings an adapter was made with; kept on the model so save_adapter can write them."""
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | list[str] = "all-linear"
    rslora: bool = False
    dora: bool = False
    modules_to_save: list[str] = field(default_factory=list)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{checkpoint name: LoRALinear} of every adapter in the model."""
    return {clean_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: str | list[str]) -> bool:
    """peft's rule: a list matches a module whose name is, or ends with '.' + , an entry; a string other
    than 'all-linear' is a regular expression the whole name must match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: str | list[str] = "all-linear", rslora: bool = False, dora: bool = False,
               dtype: torch.dtype | None = None) -> list[str]:
    """Replace the targeted nn.Linear layers by LoRALinear, in place; return their names.

    targets: "all-linear" (every Linear in the blocks, not lm_head, as peft), a list of names matched by
    suffix (["q_proj", "v_proj"], GPT-2's ["c_attn", "c_proj", "c_fc"]), or a regular expression.
    dtype: the adapters' dtype (default: the base weight's). Does not freeze anything: see
    `mark_only_lora_trainable`.
    """
    if lora_modules(model):
        raise UserError("the model already has LoRA adapters; apply LoRA once, to a plain model")
    root = unwrap(model)
    head = getattr(root, "lm_head", None)
    cfg = getattr(root, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            raise UserError(f"LoRA targets {targets!r} is not a valid regular expression ({e})") from None
    chosen: list[tuple[str, str, nn.Linear]] = []  # (name in model, checkpoint name, module)
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        cname = clean_name(name)
        if targets == "all-linear":
            ok = m is not head
        else:
            ok = _matches(cname, targets)
            if ok and m is head and tied:
                raise UserError("lm_head shares its weight with the embedding (tie_word_embeddings); "
                                "train it with modules_to_save instead of a LoRA target")
        if ok:
            chosen.append((name, cname, m))
    if not chosen:
        linears = sorted({clean_name(n).rpartition(".")[2] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear)})
        raise UserError(f"LoRA targets {targets!r} match no Linear layer of this model "
                        f"(its Linear layers are named {', '.join(linears)})")
    if isinstance(targets, list):
        for t in targets:
            if not any(_matches(c, [t]) for _, c, _ in chosen):
                raise UserError(f"LoRA target {t!r} matches no Linear layer of this model")
    for name, _, m in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LoRALinear(m, r, alpha, dropout, rslora, dora, dtype))
    root.lora_config = LoRAConfig(r, alpha, dropout, targets if isinstance(targets, str) else list(targets),
                                  rslora, dora)
    return [c for _, c, _ in chosen]


def _modules_to_save(model: nn.Module, names) -> dict[str, nn.Module]:
    """{checkpoint name: module} for each entry of modules_to_save (matched by suffix, as peft)."""
    found = {clean_name(n): m for n, m in model.named_modules()
             if n and _matches(clean_name(n), list(names)) and not isinstance(m, LoRALinear)}
    for t in names:
        if not any(_matches(n, [t]) for n in found):
            raise UserError(f"modules_to_save entry {t!r} matches no module of this model")
    return found


def mark_only_lora_trainable(model: nn.Module, modules_to_save=()) -> list[str]:
    """Freeze everything but the adapters (and the modules named in modules_to_save, e.g.
    ["embed_tokens", "lm_head"], trained in full); return the names of the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model).values():
        for p in (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector):
            if p is not None:
                p.requires_grad_(True)
    for m in _modules_to_save(model, modules_to_save).values():
        for p in m.parameters():  # a tied lm_head shares the embedding Parameter: both train
            p.requires_grad_(True)
    root = unwrap(model)
    if getattr(root, "lora_config", None) is not None:
        root.lora_config.modules_to_save = list(modules_to_save)
    return [clean_name(n) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------------
# Adapter tensors: for the trainer's checkpoints, and for the PEFT files


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable part of a LoRA model under checkpoint names: every adapter tensor, plus the
    parameters of modules_to_save. Tensors are detached, not copied."""
    sd = {}
    for name, m in lora_modules(model).items():
        sd[f"{name}.lora_A.weight"] = full_tensor(m.lora_A.weight).detach()
        sd[f"{name}.lora_B.weight"] = full_tensor(m.lora_B.weight).detach()
        if m.lora_magnitude_vector is not None:
            sd[f"{name}.lora_magnitude_vector"] = full_tensor(m.lora_magnitude_vector).detach()
    cfg = getattr(unwrap(model), "lora_config", None)
    for name, m in _modules_to_save(model, cfg.modules_to_save if cfg else ()).items():
        for pname, p in m.named_parameters():
            sd[f"{name}.{pname}"] = full_tensor(p).detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, Tensor], where: str = "state dict") -> None:
    """Copy tensors named as `lora_state_dict` names them into the model; every adapter tensor must be
    present and every tensor must fit (one-line UserError otherwise)."""
    params = {clean_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}
    missing = [n for n in lora_state_dict(model) if n not in sd and n.endswith(LORA_PARAMS)]
    unexpected = [n for n in sd if n not in params]
    if missing or unexpected:
        what = (f"missing {len(missing)} adapter tensor(s) e.g. {missing[:2]}" if missing else "") + \
               ("; " if missing and unexpected else "") + \
               (f"{len(unexpected)} tensor(s) the model has no place for, e.g. {unexpected[:2]}" if unexpected else "")
        raise UserError(f"{where} does not fit this model ({what}): was it made for a different base model?")
    for name, t in sd.items():
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{where}: {name} has shape {tuple(t.shape)}, this model needs {tuple(p.shape)}: "
                            "was it made for a different base model?")
        p.copy_(t.to(device=p.device, dtype=p.dtype))


def _is_conv1d(root: nn.Module, name: str) -> bool:
    """A GPT-2 weight Hugging Face stores transposed (Conv1D, (in, out))."""
    cfg = getattr(root, "config", None)
    parts = name.split(".")
    return bool(getattr(cfg, "is_gpt2", False)) and len(parts) >= 2 and parts[-2] in CONV1D_LEAVES \
        and parts[-1] == "weight"


def _peft_target_modules(model: nn.Module) -> list[str]:
    """target_modules for adapter_config.json: the leaf names (["q_proj", ...]) when they pick exactly the
    adapted layers, otherwise every adapted layer's full name (peft matches both the same way)."""
    wrapped = set(lora_modules(model))
    leaves = sorted({n.rpartition(".")[2] for n in wrapped})
    picked = {clean_name(n) for n, m in model.named_modules()
              if isinstance(m, (nn.Linear, LoRALinear)) and _matches(clean_name(n), leaves)}
    return leaves if picked == wrapped else sorted(wrapped)


def tied_modules(model: nn.Module) -> tuple[str, str] | None:
    """(embedding, head) checkpoint names when the head shares the embedding's weight (tie_word_embeddings:
    Qwen2, Llama 3.2 1B/3B, GPT-2), e.g. ("model.embed_tokens", "lm_head"); None otherwise."""
    head = getattr(unwrap(model), "lm_head", None)
    if head is None:
        return None
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.weight is head.weight:
            return clean_name(name), "lm_head"
    return None


def untie_head(model: nn.Module) -> None:
    """Give the head its own copy of the embedding weight (tie_word_embeddings becomes false)."""
    root = unwrap(model)
    w = root.lm_head.weight
    root.lm_head.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
    root.config.tie_word_embeddings = False


def save_adapter(model: nn.Module, out_dir: str, base_model_name_or_path: str, writer: bool = True,
                 tokenizer=None, dtype: torch.dtype | None = None) -> None:
    """Write the adapter as peft does (adapter_config.json + adapter_model.safetensors), atomically, with the
    tokenizer's files beside it when one is given (peft users load the tokenizer from the adapter directory).
    dtype: of every tensor written (default: as they are; trained adapters are fp32, as peft keeps them).
    Under FSDP2 every rank calls this (the adapter tensors are gathered from their shards); only the
    `writer` writes.

    base_model_name_or_path is recorded as an absolute path when it is a directory, so the adapter finds its
    base from any working directory (peft's AutoPeftModelForCausalLM, chat.py and eval.py read it); a preset
    name ("tiny") stays a name (`nanolisa preset tiny --out DIR` writes that base where peft can load it).

    Tied embeddings: with the embedding or the head in modules_to_save, nanolisa trains the one weight they
    share, so both change. peft keeps a copy per module of modules_to_save and ties the two copies only when
    its config says ensure_weight_tying, so the adapter names both modules, holds both copies (peft loads
    each from its own key) and says ensure_weight_tying (older peft ignores it and still loads equal copies)."""
    mods = lora_modules(model)
    if not mods:
        raise UserError("the model has no LoRA adapters to save (call apply_lora or load_adapter first)")
    if any(m.merged for m in mods.values()):
        raise UserError("the adapters are merged into the weights; unmerge them before saving the adapter")
    root = unwrap(model)
    one = next(iter(mods.values()))
    cfg = getattr(root, "lora_config", None) or LoRAConfig(one.r, one.alpha, one.dropout, "all-linear",
                                                           one.rslora, one.dora)
    modules_to_save = list(cfg.modules_to_save)
    sd = lora_state_dict(model)
    tied = tied_modules(model)
    tie = tied is not None and any(_matches(n, modules_to_save) for n in tied)
    if tie:
        weight = sd.get(f"{tied[0]}.weight", sd.get(f"{tied[1]}.weight"))
        for name in tied:
            sd[f"{name}.weight"] = weight
            if not _matches(name, modules_to_save):
                modules_to_save.append(name.rpartition(".")[2])
    tensors = {}
    for name, t in sd.items():
        if _is_conv1d(root, name):  # a GPT-2 Conv1D module saved whole: Hugging Face's (in, out) layout
            t = t.t()
        # .clone(): safetensors refuses tensors sharing memory (a tied lm_head and embedding).
        tensors[PEFT_PREFIX + name] = t.to(dtype or t.dtype).contiguous().clone().cpu()
    if not writer:
        return
    is_gpt2 = bool(getattr(getattr(root, "config", None), "is_gpt2", False))
    base = os.path.abspath(base_model_name_or_path) if os.path.isdir(base_model_name_or_path) else \
        base_model_name_or_path
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": one.r,
        "lora_alpha": one.alpha,
        "lora_dropout": one.dropout,
        "target_modules": _peft_target_modules(model),
        "fan_in_fan_out": is_gpt2,  # GPT-2's targets are Conv1D in transformers
        "bias": "none",
        "lora_bias": False,
        "use_rslora": one.rslora,
        "use_dora": one.dora,
        "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": tie,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with staging_dir(out_dir, prefix=".tmp-adapter-") as tmp:
        # nanolisa's own writer: safetensors' save_file leaves the file 0600, whatever the umask
        out = [OutTensor(k, tuple(t.shape), t.dtype, lambda t=t: t, False) for k, t in tensors.items()]
        write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS), out, {"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        write_json(os.path.join(tmp, ADAPTER_CONFIG), config)
        # keeps whatever else the directory holds, but not another base's tokenizer files
        install_dir(tmp, out_dir, stale=lambda name: tokenizer is not None and name in TOKENIZER_FILES,
                    last=ADAPTER_CONFIG)


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json, checked for the features nanolisa supports (one-line UserError otherwise)."""
    if not os.path.isdir(adapter_dir):
        raise UserError(f"{adapter_dir}: no such adapter directory")
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise UserError(f"{adapter_dir}: no {ADAPTER_CONFIG} (is this a LoRA adapter directory?)")
    c = read_json(path)
    if c.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {c.get('peft_type')!r} is not supported, only LORA")
    unsupported = {"bias": c.get("bias", "none") != "none", "lora_bias": c.get("lora_bias"),
                   "rank_pattern": c.get("rank_pattern"), "alpha_pattern": c.get("alpha_pattern"),
                   "layers_to_transform": c.get("layers_to_transform") is not None,
                   "exclude_modules": c.get("exclude_modules"), "target_parameters": c.get("target_parameters"),
                   "trainable_token_indices": c.get("trainable_token_indices"),
                   "layer_replication": c.get("layer_replication")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise UserError(f"{path}: uses {', '.join(bad)}, which nanolisa's LoRA does not support")
    if not c.get("target_modules"):
        raise UserError(f"{path}: no target_modules")
    return c


def load_adapter(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Apply the adapter in adapter_dir (PEFT format, written by peft or by nanolisa) to a plain model."""
    c = read_adapter_config(adapter_dir)
    if lora_modules(model):
        raise UserError(f"cannot load {adapter_dir}: the model already has LoRA adapters; load into a plain model")
    wpath = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(wpath):
        raise UserError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(wpath, framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{wpath}: unreadable safetensors file ({e}); is it truncated?") from None
    tied, mts = tied_modules(model), c.get("modules_to_save") or []
    # peft gives each module of modules_to_save its own copy, and ties the embedding's and the head's only
    # when told to (ensure_weight_tying) and when it knows one of them by name (its EMBEDDING_LAYER_NAMES):
    # otherwise the head of a tied model no longer follows a trained embedding (nor the embedding a trained
    # head) there, so it must not here either.
    peft_ties = c.get("ensure_weight_tying") and any(m.split(".")[-1] in ("embed_tokens", "lm_head") for m in mts)
    if tied and not peft_ties and any(_matches(n, mts) for n in tied):
        untie_head(model)
    try:
        apply_lora(model, r=int(c["r"]), alpha=c["lora_alpha"], dropout=c.get("lora_dropout", 0.0),
                   targets=c["target_modules"], rslora=bool(c.get("use_rslora")), dora=bool(c.get("use_dora")))
    except UserError as e:
        raise UserError(f"{adapter_dir}: {e} (was the adapter made for a different architecture?)") from None
    root = unwrap(model)
    root.lora_config.modules_to_save = list(c.get("modules_to_save") or [])
    _modules_to_save(model, root.lora_config.modules_to_save)  # each must name a module of this model
    sd = {}
    for key, t in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name.endswith(".lora_magnitude_vector.weight"):  # the name older peft versions wrote
            name = name.removesuffix(".weight")
        if _is_conv1d(root, name):
            t = t.t()
        sd[name] = t
    load_lora_state_dict(model, sd, where=wpath)
    return model


# ----------------------------------------------------------------------------------------------------------
# Merging


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back, so that
    `nanolisa.save_pretrained` writes an ordinary checkpoint. Returns the same model."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        m.merge()
        with torch.device("meta"):  # allocate nothing: the merged Parameters move over
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        lin.weight = m.weight
        lin.bias = m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, lin)
    root = unwrap(model)
    if hasattr(root, "lora_config"):
        del root.lora_config
    return model
