"""Rotary position embeddings (RoFormer, Su et al. 2021, arXiv 2104.09864) and the context-extension variants
the supported checkpoints use.

Each pair of channels (i, i + d/2) of a query or key head is rotated by the angle position * inv_freq[i],
inv_freq[i] = theta^(-2i/d), so that q.k depends only on the distance between the two positions. d is the
rotary dimension: the whole head, or its first partial_rotary_factor share (Phi-3.5/4-mini), the rest of
the channels passing through. The variants change inv_freq (and, for longrope, scale cos and sin):

  linear    position interpolation (Chen et al. 2023, arXiv 2306.15595): inv_freq / factor
  dynamic   NTK-aware scaling: theta grows with the sequence length n once n outgrows the trained context L,
            theta * (factor n / L - (factor - 1))^(d / (d - 2))
  llama3    Llama 3.1: low frequencies / factor, high ones kept, a smooth blend in between
  longrope  LongRoPE (Ding et al. 2024, arXiv 2402.13753), Phi-3: inv_freq / short_factor[i] while the
            sequence fits original_max_position_embeddings, / long_factor[i] past it; cos and sin times
            attention_factor

Only dynamic and longrope depend on the sequence length, which they read from the largest position id as a
tensor (never `int(...)`, which would wait for the GPU in every forward pass): no host sync on any path.
Which RoPE a layer uses is the config's business (ModelConfig.rope_of): Gemma 3's sliding layers have
their own base (rope_local), SmolLM3 leaves every fourth layer unrotated.
"""
from __future__ import annotations

import math

import torch

from nanolisa.config import ModelConfig

Tensor = torch.Tensor


def rope_inv_freq(cfg: ModelConfig, position_ids: Tensor | None = None, local: bool = False
                  ) -> tuple[Tensor, float]:
    """(inv_freq (d/2,) fp32, scale of cos and sin) for a forward pass over position_ids (B, T); `local`:
    Gemma 3's sliding-layer RoPE. position_ids matter only to dynamic and longrope."""
    theta, s = cfg.rope_local if local else (cfg.rope_theta, cfg.rope_scaling)
    s = s or {"rope_type": "default"}
    kind, d = s["rope_type"], cfg.rotary_dim
    device = position_ids.device if position_ids is not None else None
    exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d  # (d/2,)
    if kind == "dynamic":  # NTK-aware: grow the base once the sequence outgrows the trained context
        L = cfg.max_position_embeddings
        n = (position_ids.max() + 1).clamp(min=L)  # a 0-dim tensor: no host sync
        theta = theta * ((s["factor"] * n / L) - (s["factor"] - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / (theta ** exponents)
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
    elif kind == "longrope":  # one factor per frequency, the long set once past the pretraining length
        short, long = (torch.tensor(s[k], dtype=torch.float32, device=device) for k in ("short_factor", "long_factor"))
        base = theta ** exponents
        beyond = position_ids.max() + 1 > s["original_max_position_embeddings"]  # 0-dim: no host sync
        inv_freq = torch.where(beyond, 1.0 / (long * base), 1.0 / (short * base))
        return inv_freq, s["attention_factor"]
    return inv_freq, 1.0


def rope_cos_sin(cfg: ModelConfig, position_ids: Tensor, local: bool = False) -> tuple[Tensor, Tensor]:
    """cos and sin of every (position, frequency) angle, (B, T, d), computed in fp32."""
    inv_freq, scale = rope_inv_freq(cfg, position_ids, local)
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, d/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, d): the two halves of each head rotate together
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, fp32: bool = False) -> Tensor:
    """Rotate x (B, n, T, hs): channel i pairs with channel i + d/2 (the Hugging Face layout), for the first
    d = cos.size(-1) channels; any channels past d pass through unrotated (partial rotary). The rotation is
    computed in x's dtype, or (fp32, as OLMo 2 does) in fp32 and then cast back."""
    dtype = x.dtype
    x = x.float() if fp32 else x
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, d)
    d = cos.size(-1)
    rot, rest = (x, None) if d == x.size(-1) else (x[..., :d], x[..., d:])
    x1, x2 = rot.chunk(2, dim=-1)
    out = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return (out if rest is None else torch.cat((out, rest), dim=-1)).to(dtype)
