"""The models: one decoder for the Llama family (Llama 2/3, Mistral, Qwen2) and one for GPT-2.

Read this file top to bottom: rotary embeddings, attention, the two kinds of block, and the `CausalLM`
base class that runs the stack. Module names mirror the Hugging Face checkpoints
(`model.layers.3.self_attn.q_proj`, `transformer.h.3.attn.c_attn`, ...), so loading a checkpoint is a
key copy (see checkpoint.py) and `model.state_dict()` has the checkpoint's keys.

Shapes: B batch, T query length, S key length (T plus what the KV cache holds), C hidden size,
nh query heads, nkv key/value heads (grouped-query attention when nkv < nh), hs head size, V vocab.

What the rest of nanolisa relies on:
  model(input_ids, position_ids=None, kv_cache=None) -> logits (B, T, V)
  model(input_ids, ..., targets=targets) -> the NLL of each position (B, T), from model.head_loss
                       (nanolisa/loss.py; kernels/ swap in a head + loss that never builds the full logits)
  model.blocks         the transformer blocks, addressable by index (LISA samples from these)
  model.embed_modules  the input embeddings; model.head_modules: final norm and LM head
  model.set_attention(fn)  swap the attention kernel, fn(q, k, v, mask: AttentionMask) (kernels/ plugs
                           flash attention in here)
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanolisa.activations import ACTIVATIONS
from nanolisa.config import ModelConfig
from nanolisa.loss import head_nll

Tensor = torch.Tensor

# ----------------------------------------------------------------------------------------------------------
# Attention kernel. Everything below calls attention through this one signature, so a faster kernel
# (kernels/flash_attention.py) can replace it without touching the model.


def document_ids(position_ids: Tensor) -> Tensor:
    """The document index of each token of packed rows (B, T): a new document starts where a position is 0."""
    return (position_ids == 0).cumsum(dim=1)


def attention_mask(position_ids: Tensor, start: int, packed: bool) -> tuple[Tensor | None, bool]:
    """The dense mask for one forward pass, as (mask, is_causal).

    - Plain training rows: causal, no mask tensor needed (the kernel's fast path).
    - Packed rows (`packed`): several documents share a row and positions restart at 0 at each one, so a
      token may only see earlier tokens of its own document: a block-diagonal causal mask.
    - Decoding with a KV cache from position `start`: query i sits at position start+i and sees keys 0..start+i.
    """
    B, T = position_ids.shape
    if packed:
        doc = document_ids(position_ids)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
        return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None], False  # (B, 1, T, T)
    if start == 0:
        return None, T > 1
    if T == 1:
        return None, False  # one new token sees everything cached
    q_pos = torch.arange(start, start + T, device=position_ids.device)
    k_pos = torch.arange(start + T, device=position_ids.device)
    return (k_pos[None, :] <= q_pos[:, None])[None, None], False  # (1, 1, T, S)


class AttentionMask:
    """Which keys each query may see in one forward pass, described rather than spelled out.

    It holds what decides visibility -- the position ids (B, T), the KV-cache offset `start` (query i sits
    at position start+i) and whether rows are `packed` -- and builds anything derived from them at most once
    per forward, however many layers ask: the dense (B, 1, T, S) mask that `sdpa_attention` needs
    (`dense()`), or whatever a kernel derives instead (kernels/flash_attention.py reads document boundaries,
    so packing costs it no (T, T) mask at all)."""

    def __init__(self, position_ids: Tensor, start: int, packed: bool):
        self.position_ids, self.start, self.packed = position_ids, start, packed
        self._built: dict[str, object] = {}

    def cached(self, name: str, build: Callable[[], object]) -> object:
        """build() the first time `name` is asked for in this forward pass; the same object afterwards."""
        if name not in self._built:
            self._built[name] = build()
        return self._built[name]

    def dense(self) -> tuple[Tensor | None, bool]:
        """(mask (B or 1, 1, T, S) bool or None, is_causal), as `attention_mask` returns them."""
        return self.cached("dense", lambda: attention_mask(self.position_ids, self.start, self.packed))


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """q (B, nh, T, hs), k and v (B, nkv, S, hs) -> (B, nh, T, hs): PyTorch's scaled_dot_product_attention."""
    dense, is_causal = mask.dense()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=is_causal,
                                          enable_gqa=q.size(1) != k.size(1))


AttentionFn = Callable[[Tensor, Tensor, Tensor, AttentionMask], Tensor]


class KVCache:
    """A static key/value cache for generation: prefill once, then one token per step (as in gpt-fast)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_size: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0  # how many positions are filled; advanced by the model after each forward

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's k, v (B, nkv, T, hs) and return all keys/values so far (B, nkv, S, hs)."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoFormer, arXiv 2104.09864), with the context-extension variants Llama
# checkpoints use: "linear" position interpolation (arXiv 2306.15595), "dynamic" NTK scaling, and Llama 3.1's
# "llama3" frequency-dependent scaling.


def rope_inv_freq(cfg: ModelConfig, seq_len: int, device: torch.device | None = None) -> Tensor:
    """The rotation frequency of each pair of channels, (hs/2,), for sequences up to seq_len."""
    d = cfg.head_dim
    theta = cfg.rope_theta
    s = cfg.rope_scaling or {"rope_type": "default"}
    kind = s["rope_type"]
    if kind == "dynamic":  # NTK-aware: grow the base once the sequence outgrows the trained context
        L = cfg.max_position_embeddings
        n = max(seq_len, L)
        theta = theta * ((s["factor"] * n / L) - (s["factor"] - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if kind == "linear":  # position interpolation: positions / factor, i.e. frequencies / factor
        inv_freq = inv_freq / s["factor"]
    elif kind == "llama3":  # keep high frequencies, divide low ones by factor, blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, position_ids: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin of every (position, frequency) angle, (B, T, hs), computed in fp32."""
    inv_freq = rope_inv_freq(cfg, int(position_ids.max()) + 1, position_ids.device)
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, hs/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, hs): the two halves of each head rotate together
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, n, T, hs): channel i pairs with channel i + hs/2 (the Hugging Face layout)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------------------------------------
# The Llama family block: pre-norm RMSNorm, grouped-query attention with RoPE, gated MLP (SwiGLU).


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019), normalised in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, nh, nkv, hs = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(C, nh * hs, bias=qkv_bias)
        self.k_proj = nn.Linear(C, nkv * hs, bias=qkv_bias)
        self.v_proj = nn.Linear(C, nkv * hs, bias=qkv_bias)
        self.o_proj = nn.Linear(nh * hs, C, bias=cfg.attention_bias)
        self.nh, self.nkv, self.hs = nh, nkv, hs
        self.attn_fn: AttentionFn = sdpa_attention

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttentionMask, kv_cache: KVCache | None,
                layer: int) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, S, hs)
        y = self.attn_fn(q, k, v, mask)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class LlamaMLP(nn.Module):
    """Gated MLP (Shazeer 2020): down(act(gate(x)) * up(x)). With hidden_act silu, as in every Llama,
    Mistral and Qwen2 release, this is SwiGLU; config.json may name any activation in activations.py."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=bias)
        self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)
        self.act_fn = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, rope, mask, kv_cache, layer):  # x (B, T, C) -> (B, T, C)
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv_cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------
# The GPT-2 block: pre-norm LayerNorm, multi-head attention from one fused c_attn projection, GELU MLP
# (tanh-approximated GELU, "gelu_new", unless config.json's activation_function names another).
# Hugging Face stores these projections as Conv1D, weight (in, out); here they are nn.Linear, weight
# (out, in), and checkpoint.py transposes them on the way in and out.

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

    def rope(self, position_ids: Tensor) -> tuple[Tensor, Tensor] | None:
        return None

    head_loss = staticmethod(head_nll)  # (hidden (B, T, C), lm_head, targets (B, T)) -> NLL (B, T)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, kv_cache: KVCache | None = None,
                targets: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V). Pass position_ids (B, T) for packed rows (positions restart
        at 0 at each document; attention stays within a document), or kv_cache to decode incrementally.
        With targets (B, T), the next token of each position (IGNORE_INDEX where none), it returns the NLL
        of each position (B, T) instead, from `head_loss`."""
        hidden = self.hidden_states(input_ids, position_ids, kv_cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(hidden)  # (B, T, V)
        return self.head_loss(hidden, self.lm_head, targets).clone()  # (B, T), not a view (FSDP2 hooks it)

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None,
                      kv_cache: KVCache | None = None) -> Tensor:
        """The forward pass up to the final norm: input_ids (B, T) -> hidden states (B, T, C)."""
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        packed = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask = AttentionMask(position_ids, start, packed)
        rope = self.rope(position_ids)
        x = self.embed(input_ids, position_ids)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.final_norm(x)  # (B, T, C)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.lm_head.weight
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim,
                       p.dtype, p.device)

    def set_attention(self, fn: AttentionFn) -> None:
        for m in self.modules():
            if hasattr(m, "attn_fn"):
                m.attn_fn = fn

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_modules[0].weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh random weights, as transformers initialises these models (normal(0, 0.02), zero biases)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
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


class LlamaForCausalLM(CausalLM):
    """Llama 2 / Llama 3 / Mistral / Qwen2: the differences are all in the config (biases, rope, ties)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.norm_eps),
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
        return self.model.embed_tokens(input_ids)

    def rope(self, position_ids):
        return rope_cos_sin(self.config, position_ids)

    def final_norm(self, x):
        return self.model.norm(x)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            wpe=nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size),
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
    return GPT2LMHeadModel(cfg) if cfg.is_gpt2 else LlamaForCausalLM(cfg)
