"""Attention as the model calls it: which keys each query sees (`AttentionMask`) and the reference kernels.

Every attention layer calls one function, fn(q, k, v, mask, scale=None, softcap=None), so a faster kernel
(kernels/flash_attention.py, through model.set_attention) replaces it without touching the model:

    q (B, nh, T, hs), k and v (B, nkv, S, hs) -> (B, nh, T, hs)
    softmax(softcap(scale q k^T) + mask) v,   scale default hs^-1/2,   softcap(s) = c tanh(s / c) (Gemma 2)

Which keys query i sees. Query i of T sits at position start + i (start: how many positions the KV cache
already holds; S = start + T keys) and sees key j when
  * j <= start + i                         (causal),
  * j > start + i - window                 (a sliding-window layer: itself and the window - 1 keys before),
  * j is in i's document                   (--pack: documents share a row and positions restart at 0).

The PyTorch path. `sdpa_attention` hands this to torch's scaled_dot_product_attention, either as is_causal
(no mask tensor at all: plain rows) or as one boolean (B or 1, 1, T, S) mask built once per forward pass
and shared by every head and layer with the same window. Grouped-query attention (nkv < nh) stays native
(enable_gqa) where a fused kernel takes it: on CPU always, on CUDA without a mask in fp16/bf16 (flash). With
a mask or fp32 on CUDA, enable_gqa would leave SDPA only its math backend, which materialises
(B, nh, T, S) fp32 scores; there k and v are expanded to nh heads first (views of nkv heads repeated: the
memory of the keys and values, (nh / nkv) times) so the memory-efficient backend takes the mask, as
transformers does. flex_attention was the other candidate: in torch 2.13 it has no backward on CPU, eagerly
it materialises the scores too, and compiling it took ~2 minutes for one shape here. Measured peaks
(bench/bench_attention.py, README's Kernels section): a packed or windowed 2048-token GQA call, forward and
backward, adds 818 MB on the math path and 55-83 MB on the fused one.

Soft-capped scores (Gemma 2) have no SDPA backend: `softcap_attention` computes them explicitly, as
transformers' eager attention does ((B, nh, T, S) scores: memory grows with T^2; the Triton kernel, with
--kernels triton, soft-caps inside its tiles instead).
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def document_ids(position_ids: Tensor) -> Tensor:
    """The document index of each token of packed rows (B, T): a new document starts where a position is 0."""
    return (position_ids == 0).cumsum(dim=1)


def attention_mask(position_ids: Tensor, start: int, packed: bool, window: int | None = None
                   ) -> tuple[Tensor | None, bool]:
    """The dense mask for one forward pass, as (mask, is_causal): mask (B or 1, 1, T, S) bool, True where a
    query sees a key, or None when is_causal says it all (or every query sees every key)."""
    B, T = position_ids.shape
    device = position_ids.device
    if packed:  # block-diagonal causal: a token sees earlier tokens of its own document only
        doc = document_ids(position_ids)  # (B, T)
        i = torch.arange(T, device=device)
        ok = (i[None, :] <= i[:, None]) & (doc[:, :, None] == doc[:, None, :])  # (B, T, T)
        if window is not None:
            ok = ok & (i[None, :] > i[:, None] - window)
        return ok[:, None], False
    if window is None or start + T <= window:  # the window cuts nothing off: plain causal
        if start == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new token sees everything cached
    q_pos = torch.arange(start, start + T, device=device)
    k_pos = torch.arange(start + T, device=device)
    ok = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if window is not None:
        ok = ok & (k_pos[None, :] > q_pos[:, None] - window)
    return ok[None, None], False  # (1, 1, T, S)


class AttentionMask:
    """Which keys each query may see in one forward pass, described rather than spelled out.

    It holds what decides visibility -- the position ids (B, T), the KV-cache offset `start` (query i sits
    at position start+i), whether rows are `packed`, and the layer's sliding `window` -- and builds anything
    derived from them at most once per forward, however many layers ask: the dense (B, 1, T, S) mask that
    `sdpa_attention` needs (`dense()`), or whatever a kernel derives instead (kernels/flash_attention.py
    reads document boundaries, so packing costs it no (T, T) mask at all). Layers with another window share
    that cache through `with_window`."""

    def __init__(self, position_ids: Tensor, start: int, packed: bool, window: int | None = None,
                 _built: dict | None = None):
        self.position_ids, self.start, self.packed, self.window = position_ids, start, packed, window
        self._built: dict[object, object] = {} if _built is None else _built

    def with_window(self, window: int | None) -> "AttentionMask":
        """The same forward pass seen by a layer with this sliding window (None: full causal)."""
        return AttentionMask(self.position_ids, self.start, self.packed, window, self._built)

    def cached(self, name: object, build: Callable[[], object]) -> object:
        """build() the first time `name` is asked for in this forward pass; the same object afterwards."""
        if name not in self._built:
            self._built[name] = build()
        return self._built[name]

    def dense(self) -> tuple[Tensor | None, bool]:
        """(mask (B or 1, 1, T, S) bool or None, is_causal), as `attention_mask` returns them."""
        return self.cached(("dense", self.window),
                           lambda: attention_mask(self.position_ids, self.start, self.packed, self.window))


class AttentionFn(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None,
                 softcap: float | None = None) -> Tensor: ...


def expand_kv(x: Tensor, n_heads: int) -> Tensor:
    """(B, nkv, S, hs) -> (B, nh, S, hs): each key/value head repeated for the nh / nkv query heads it serves."""
    B, nkv, S, hs = x.shape
    if nkv == n_heads:
        return x
    return x[:, :, None].expand(B, nkv, n_heads // nkv, S, hs).reshape(B, n_heads, S, hs)


def _native_gqa(q: Tensor, mask: Tensor | None) -> bool:
    """Whether SDPA has a fused backend for grouped-query attention here (see the module docstring)."""
    return q.device.type == "cpu" or (mask is None and q.dtype in (torch.float16, torch.bfloat16)
                                      and q.size(-1) <= 256)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None = None,
                   softcap: float | None = None) -> Tensor:
    """q (B, nh, T, hs), k and v (B, nkv, S, hs) -> (B, nh, T, hs): PyTorch's scaled_dot_product_attention."""
    if softcap is not None:
        return softcap_attention(q, k, v, mask, scale, softcap)
    dense, is_causal = mask.dense()
    gqa = q.size(1) != k.size(1)
    if gqa and not _native_gqa(q, dense):
        k, v, gqa = expand_kv(k, q.size(1)), expand_kv(v, q.size(1)), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)


def softcap_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, scale: float | None,
                      softcap: float) -> Tensor:
    """Attention with soft-capped scores, c tanh(s / c) (Gemma 2), written out as transformers' eager
    attention computes it: scores and softcap in q's dtype, softmax in fp32."""
    dense, is_causal = mask.dense()
    T, S = q.size(2), k.size(2)
    if is_causal:
        dense = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    k, v = expand_kv(k, q.size(1)), expand_kv(v, q.size(1))
    scores = (q @ k.transpose(2, 3)) * (q.size(-1) ** -0.5 if scale is None else scale)  # (B, nh, T, S)
    scores = torch.tanh(scores / softcap) * softcap
    if dense is not None:
        scores = scores.masked_fill(~dense, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


class KVCache:
    """A static key/value cache for generation: prefill once, then one token per step (as in gpt-fast).
    It keeps every position, also past a sliding window (the mask hides what a layer must not see)."""

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
