"""The models: one decoder for the Llama-style families and one for GPT-2.

Read this file top to bottom: norms, attention, the MLP, the two kinds of block, and the `CausalLM` base
class that runs the stack. Rotary embeddings live in rope.py, which keys a query sees and the attention
kernels in attention.py. Module names mirror the Hugging Face checkpoints (`model.layers.3.self_attn.q_proj`,
`transformer.h.3.attn.c_attn`, ...), so loading a checkpoint is a key copy (see pretrained.py) and
`model.state_dict()` has the checkpoint's keys.

One decoder block serves every Llama-style family: it reads each choice from the config (config.py sets
them from model_type and config.json, as the family's transformers modeling file does), never a copy per
family. What each family turns on, besides Llama's pre-norm RMSNorm, grouped-query attention, RoPE and gated
MLP:

| model_type  | checkpoints             | what differs from Llama                                               |
|-------------|-------------------------|-----------------------------------------------------------------------|
| llama       | Llama 2, 3, 3.1-3.3     | (the reference: attention_bias, mlp_bias, rope scaling from config)   |
| mistral     | Mistral 7B              | a sliding window on every layer (when sliding_window is set)          |
| qwen2       | Qwen2, Qwen2.5          | q/k/v bias; windows on layers >= max_window_layers (if enabled)       |
| qwen3       | Qwen3 (dense)           | q/k RMSNorm per head before RoPE; a head_dim of its own; windows as   |
|             |                         | qwen2                                                                 |
| gemma2      | Gemma 2                 | embeddings x sqrt(C); RMSNorm x (1 + w) before and after attention and|
|             |                         | MLP; q scaled by query_pre_attn_scalar^-1/2; attention- and           |
|             |                         | final-logit soft-capping; sliding and global layers alternating;      |
|             |                         | GELU-tanh gated MLP                                                   |
| gemma3_text | Gemma 3 1B              | as gemma2, with q/k norm per head instead of soft-capping, a global   |
|             | (Gemma3ForCausalLM)     | layer every sliding_window_pattern layers, and their own RoPE base on |
|             |                         | sliding layers (rope_local_base_freq)                                 |
| phi3        | Phi-3, 3.5, 4, 4-mini   | fused qkv_proj and gate_up_proj; partial rotary; longrope; windows    |
| olmo2       | OLMo 2                  | no norm before attention or MLP: RMSNorm on their outputs instead;    |
|             |                         | q/k RMSNorm over the whole projection; RoPE computed in fp32          |
| smollm3     | SmolLM3                 | no RoPE on the layers no_rope_layers marks (every fourth)             |

Shapes: B batch, T query length, S key length (T plus what the KV cache holds), C hidden size,
nh query heads, nkv key/value heads (grouped-query attention when nkv < nh), hs head size, V vocab.

What the rest of nanolisa relies on:
  model(input_ids, position_ids=None, kv_cache=None) -> logits (B, T, V)
  model(input_ids, ..., targets=targets) -> the summed NLL of each row (B,), from model.head_loss
                       (nanolisa/loss.py; kernels/ swap in a head + loss that never builds the full logits)
  model.blocks         the transformer blocks, addressable by index (LISA samples from these)
  model.embed_modules  the input embeddings; model.head_modules: final norm and LM head
  model.set_attention(fn)  swap the attention kernel, fn(q, k, v, mask, scale, softcap) (attention.py;
                           kernels/ plugs flash attention in here)
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from nanolisa.activations import ACTIVATIONS
from nanolisa.attention import (AttentionFn, AttentionMask, KVCache, attention_mask,  # noqa: F401 (re-exported)
                                document_ids, sdpa_attention)
from nanolisa.config import ModelConfig
from nanolisa.loss import head_nll
from nanolisa.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: F401 (re-exported)

Tensor = torch.Tensor


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap): squashes x smoothly into (-cap, cap) (Gemma 2's logit soft-capping)."""
    return x if cap is None else torch.tanh(x / cap) * cap


# ----------------------------------------------------------------------------------------------------------
# The Llama-style block: RMSNorm, grouped-query attention with RoPE, gated MLP, each choice from the config.


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), normalised in fp32.

    Llama casts the normalised x back to its dtype, then multiplies by the weight. Gemma and OLMo 2 multiply
    in fp32 first, then cast (`weight_fp32`); Gemma scales by 1 + weight (`offset` 1: its checkpoints store
    the difference from 1, which starts at 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, weight_fp32: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset, self.weight_fp32 = eps, offset, weight_fp32

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_fp32:
            return (x * (self.weight.float() + self.offset)).to(dtype)
        return (self.weight + self.offset if self.offset else self.weight) * x.to(dtype)


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding(num, dim), left uninitialised when built on the meta device (as every load builds it):
    init_weights or the checkpoint fills it later, and torch's default initialisation, normal_, on a meta
    tensor imports torch._dynamo (2 s and 116 MB in every process) for weights that do not exist yet."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
    return nn.Embedding(num, dim)


def rms_norm(cfg: ModelConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset, cfg.norm_weight_fp32)


class Attention(nn.Module):
    """Grouped-query attention with RoPE. Phi-3 keeps q, k, v in one qkv_proj (as on disk); Qwen3 and
    Gemma 3 RMSNorm q and k per head, OLMo 2 over the whole projection, before RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, nh, nkv, hs = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        if cfg.fused_projections:
            self.qkv_proj = nn.Linear(C, (nh + 2 * nkv) * hs, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(C, nh * hs, bias=qkv_bias)
            self.k_proj = nn.Linear(C, nkv * hs, bias=qkv_bias)
            self.v_proj = nn.Linear(C, nkv * hs, bias=qkv_bias)
        self.o_proj = nn.Linear(nh * hs, C, bias=cfg.attention_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = rms_norm(cfg, hs if per_head else nh * hs)
            self.k_norm = rms_norm(cfg, hs if per_head else nkv * hs)
        self.nh, self.nkv, self.hs = nh, nkv, hs
        self.scale, self.softcap, self.rope_fp32 = cfg.query_scale, cfg.attn_softcap, cfg.rope_fp32
        self.attn_fn: AttentionFn = sdpa_attention

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: AttentionMask,
                kv_cache: KVCache | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        nh, nkv, hs = self.nh, self.nkv, self.hs
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh*hs), 2 x (B, T, nkv*hs)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, T, nh, hs), k.view(B, T, nkv, hs), v.view(B, T, nkv, hs)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), 2 x (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope, self.rope_fp32), apply_rope(k, *rope, self.rope_fp32)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, S, hs)
        y = self.attn_fn(q, k, v, mask, self.scale, self.softcap)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))


class MLP(nn.Module):
    """Gated MLP (Shazeer 2020): down(act(gate(x)) * up(x)). With silu (Llama, Mistral, Qwen, Phi, OLMo,
    SmolLM) this is SwiGLU, with gelu_pytorch_tanh (Gemma) GeGLU; config.json may name any activation in
    activations.py. Phi-3 keeps gate and up in one gate_up_proj (as on disk), gate first."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.fused_projections:
            self.gate_up_proj = nn.Linear(C, 2 * H, bias=bias)
        else:
            self.gate_proj = nn.Linear(C, H, bias=bias)
            self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)
        self.act_fn = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(gate) * up)


# Where a family's block has its RMSNorms, by role -- (on attention's input, on its output, on the MLP's
# input, on its output) -- under the names its checkpoints give them. Note that Llama's
# "post_attention_layernorm" is the MLP's input norm, Gemma's and OLMo 2's the norm of attention's output.
NORMS = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),  # Llama and most
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),  # Gemma 2, 3
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),  # OLMo 2
}


class DecoderBlock(nn.Module):
    """x + norm1(attention(norm0(x))), then + norm3(mlp(norm2(x))), the norms a family lacks left out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_names = NORMS[cfg.norm_placement]
        for name in self.norm_names:
            if name is not None:
                setattr(self, name, rms_norm(cfg, cfg.hidden_size))
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def norm(self, role: int, x: Tensor) -> Tensor:
        name = self.norm_names[role]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, rope, mask, kv_cache, layer):  # x (B, T, C) -> (B, T, C)
        x = x + self.norm(1, self.self_attn(self.norm(0, x), rope, mask, kv_cache, layer))
        return x + self.norm(3, self.mlp(self.norm(2, x)))


# ----------------------------------------------------------------------------------------------------------
# The GPT-2 block: pre-norm LayerNorm, multi-head attention from one fused c_attn projection, GELU MLP
# (tanh-approximated GELU, "gelu_new", unless config.json's activation_function names another).
# Hugging Face stores these projections as Conv1D, weight (in, out); here they are nn.Linear, weight
# (out, in), and pretrained.py transposes them on the way in and out.

class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C = cfg.hidden_size
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.nh, self.hs = cfg.num_attention_heads, cfg.head_dim
        self.attn_fn: AttentionFn = sdpa_attention

    def forward(self, x, rope, mask, kv_cache, layer):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.nh, self.hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        y = self.attn_fn(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, rope, mask, kv_cache, layer):
        x = x + self.attn(self.ln_1(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------
# The stack.


class CausalLM(nn.Module):
    """Embeddings -> blocks -> final norm -> LM head. Subclasses name the parts as their checkpoints do."""

    config: ModelConfig
    blocks: nn.ModuleList
    lm_head: nn.Linear
    gradient_checkpointing: bool = False  # recompute each block's activations in backward to save memory

    def embed(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def final_norm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def rope(self, position_ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """cos and sin of each RoPE the layers use, by ModelConfig.rope_of's name; none for GPT-2."""
        return {}

    head_loss = staticmethod(head_nll)  # (hidden (B, T, C), lm_head, targets (B, T), softcap) -> NLL (B, T)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, kv_cache: KVCache | None = None,
                targets: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V). Pass position_ids (B, T) for packed rows (positions restart
        at 0 at each document; attention stays within a document), or kv_cache to decode incrementally.
        With targets (B, T), the next token of each position (IGNORE_INDEX where none), it returns the NLL
        of each row (B,) instead: `head_loss`'s per-position NLL (B, T), summed over the positions."""
        hidden = self.hidden_states(input_ids, position_ids, kv_cache)  # (B, T, C)
        cap = self.config.final_softcap
        if targets is None:
            return soft_cap(self.lm_head(hidden), cap)  # (B, T, V)
        return self.head_loss(hidden, self.lm_head, targets, softcap=cap).sum(dim=1)  # (B,)

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None,
                      kv_cache: KVCache | None = None) -> Tensor:
        """The forward pass up to the final norm: input_ids (B, T) -> hidden states (B, T, C)."""
        B, T = input_ids.shape
        cfg = self.config
        start = kv_cache.pos if kv_cache is not None else 0
        packed = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask = AttentionMask(position_ids, start, packed)  # builds what the layers need once, shared
        ropes = self.rope(position_ids)
        x = self.embed(input_ids, position_ids)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            rope, layer_mask = ropes.get(cfg.rope_of(i)), mask.with_window(cfg.window(i))
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, layer_mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, layer_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.final_norm(x)  # (B, T, C)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                       p.dtype, p.device)

    @property
    def rope_switch(self) -> int | None:
        """The sequence length past which every position's rotation changes (longrope switches to its long
        factors): keys cached for a shorter sequence are stale beyond it, and a decoder must compute them
        again, as transformers' generate does for Phi-3. None when RoPE never changes that way."""
        s = self.config.rope_scaling or {}
        return s.get("original_max_position_embeddings") if s.get("rope_type") == "longrope" else None

    def set_attention(self, fn: AttentionFn) -> None:
        for m in self.modules():
            if hasattr(m, "attn_fn"):
                m.attn_fn = fn

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_modules[0].weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh random weights, as transformers initialises these models (normal(0, 0.02), zero biases,
        norms that start as the identity: weight 1, or 0 where the norm scales by 1 + weight)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0 - getattr(m, "offset", 0.0))
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        self.tie_weights()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside any wrapper (DDP's `.module`, torch.compile's `._orig_mod`, ...): the first module
    that has transformer `.blocks` of its own, not by forwarding attribute reads to what it wraps."""
    for m in model.modules():
        if hasattr(type(m), "blocks") or "blocks" in m._modules:
            return m
    raise TypeError(f"{type(model).__name__} has no .blocks: not a nanolisa model, and it wraps none")


class DecoderForCausalLM(CausalLM):
    """Every Llama-style family of the table above: the differences are all in the config."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=rms_norm(cfg, cfg.hidden_size),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def embed_modules(self) -> list[nn.Module]:
        return [self.model.embed_tokens]

    @property
    def head_modules(self) -> list[nn.Module]:
        return [self.model.norm, self.lm_head]

    def embed(self, input_ids, position_ids):
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        if self.config.embed_scale:  # Gemma: times sqrt(C), rounded to the embeddings' dtype as transformers does
            x = x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype).item()
        return x

    def rope(self, position_ids):
        cfg = self.config
        kinds = {cfg.rope_of(i) for i in range(cfg.num_hidden_layers)} - {None}
        return {kind: rope_cos_sin(cfg, position_ids, local=kind == "local") for kind in sorted(kinds)}

    def final_norm(self, x):
        return self.model.norm(x)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=embedding(cfg.vocab_size, cfg.hidden_size),
            wpe=embedding(cfg.max_position_embeddings, cfg.hidden_size),
            h=nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_hidden_layers)),
            ln_f=nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def embed_modules(self) -> list[nn.Module]:
        return [self.transformer.wte, self.transformer.wpe]

    @property
    def head_modules(self) -> list[nn.Module]:
        return [self.transformer.ln_f, self.lm_head]

    def embed(self, input_ids, position_ids):
        return self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)

    def final_norm(self, x):
        return self.transformer.ln_f(x)


def build_model(cfg: ModelConfig) -> CausalLM:
    """An untrained model for cfg (build it under `torch.device("meta")` to allocate nothing)."""
    return GPT2LMHeadModel(cfg) if cfg.is_gpt2 else DecoderForCausalLM(cfg)
