"""Text generation: the decoding loop behind chat.py and eval.py's accuracy metric.

One sequence at a time, with a static KV cache (as in gpt-fast): the prompt is run through the model once
("prefill"), which fills the cache with every prompt position's keys and values; after that each step feeds
only the one new token, attending to everything cached. Decoding is O(T) per token instead of O(T^2).

Choosing the next token from the last position's logits follows Hugging Face `generate` step by step, so
greedy output is token-for-token that of `generate(do_sample=False)` and the sampling knobs mean the same:

  1. repetition penalty (CTRL, Keskar et al. 2019, arXiv 1909.05858 sec. 4.1): every token already in the
     sequence (prompt included) has its logit divided by the penalty if positive, multiplied if negative;
  2. greedy (temperature 0): argmax. Otherwise: logits / temperature, then
  3. top-k: keep the k largest logits;
  4. top-p / nucleus (Holtzman et al. 2019, arXiv 1904.09751): keep the smallest set of most likely
     tokens whose probability adds up to at least p;
  5. sample from the softmax of what is left.

A `Decoder` keeps its cache between calls: in a chat, each turn's prompt is the whole conversation so far,
which starts with the tokens already cached, so only the new part (the user's message) is prefilled.
One exception (model.rope_switch): a longrope model (Phi-3 with a 128k context) rotates every position by
other factors once the sequence outgrows original_max_position_embeddings, so the cached keys are computed
again at that point, as transformers' generate does for Phi-3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from nanolisa.errors import UserError
from nanolisa.templates import resolve_template
from nanolisa.tokenizer import END_OF_TURN_TOKENS

Tensor = torch.Tensor
MIN_TEMPERATURE = 1e-4  # below it logits / temperature can overflow float32; 0 (greedy) is what it approaches
NOT_FINITE = ("the model's outputs are not finite (NaN or infinite logits: weights with NaN/inf, or fp16 "
              "overflow: try --dtype fp32)")


@dataclass
class Sampling:
    """How to pick the next token. temperature 0 = greedy; top_k 0 and top_p 1.0 = no cut; penalty 1.0 = off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def check(self) -> "Sampling":
        for flag, v in (("--temperature", self.temperature), ("--top-p", self.top_p),
                        ("--repetition-penalty", self.repetition_penalty)):
            if not math.isfinite(v):
                raise UserError(f"{flag} {v}: must be a finite number")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be >= 0 (0 = greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            # logits / temperature overflows float32 to inf, and the softmax of inf is NaN
            raise UserError(f"--temperature {self.temperature}: too small to divide the logits by; use 0 for "
                            f"greedy decoding (what a temperature near 0 means) or at least {MIN_TEMPERATURE}")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0 (0 = no top-k cut)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1] (1 = no nucleus cut)")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty {self.repetition_penalty}: must be > 0 (1 = off)")
        return self


# ----------------------------------------------------------------------------------------------------------
# Logits processing. Each function takes scores (B, V) and returns new scores; removed tokens get -inf.


def repetition_penalty(scores: Tensor, seen_ids: Tensor, penalty: float) -> Tensor:
    """Make every token in seen_ids (B, S) less likely: positive logits / penalty, negative ones * penalty."""
    score = scores.gather(1, seen_ids)  # (B, S)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, seen_ids, score)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """Keep the k largest scores of each row (ties with the k-th are kept too)."""
    k = min(max(k, 1), scores.size(-1))
    kth = torch.topk(scores, k).values[..., -1, None]  # (B, 1)
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most 1 - p."""
    sorted_scores, order = torch.sort(scores, descending=False)  # least likely first
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop_sorted = cum <= (1 - p)
    drop_sorted[..., -1:] = False  # always keep the most likely token
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, float("-inf"))


def check_finite(logits: Tensor) -> None:
    """Refuse NaN / inf logits: argmax over NaN is token 0 (a NUL byte in a byte-level vocabulary) and
    sampling from them fails, so a broken model would otherwise stream garbage or score 0 in silence."""
    if not bool(torch.isfinite(logits).all()):
        raise UserError(NOT_FINITE)


def next_token(logits: Tensor, seen_ids: Tensor, sampling: Sampling,
               generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) of the last position, seen_ids (B, S) the sequence so far -> next ids (B,)."""
    check_finite(logits)
    scores = logits.float()
    if sampling.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, seen_ids, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / sampling.temperature
    if sampling.top_k > 0:
        scores = top_k_filter(scores, sampling.top_k)
    if sampling.top_p < 1.0:
        scores = top_p_filter(scores, sampling.top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------------------
# The decoding loop.


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Decoder:
    """Generates from one model, one sequence at a time, keeping its KV cache across calls.

    `cached` lists the tokens whose keys/values sit in the cache, in order; a new prompt that starts with
    some of them reuses that prefix and prefills only the rest.
    """

    def __init__(self, model: torch.nn.Module, use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        self.cache = None
        self.cached: list[int] = []
        self.context = int(model.config.max_position_embeddings)

    def reset(self) -> None:
        self.cache, self.cached = None, []

    def _prefill(self, ids: list[int], total: int) -> Tensor:
        """Run the part of `ids` not yet cached through the model; return the last position's logits (1, V)."""
        device = self.model.lm_head.weight.device
        reuse = min(common_prefix(self.cached, ids), len(ids) - 1)  # feed at least one token to get logits
        switch = getattr(self.model, "rope_switch", None)
        if switch is not None and (len(self.cached) > switch) != (len(ids) > switch):
            reuse = 0  # longrope rotates every position differently past its switch: recompute all keys
        if self.cache is None or self.cache.max_len < total:
            old = self.cache
            size = min(self.context, max(total, 2 * old.max_len if old is not None else 0))
            self.cache = self.model.new_kv_cache(1, size)
            if old is not None and reuse > 0:  # carry the reusable prefix over to the bigger cache
                self.cache.k[:, :, :, :reuse] = old.k[:, :, :, :reuse]
                self.cache.v[:, :, :, :reuse] = old.v[:, :, :, :reuse]
        self.cache.pos = reuse  # positions past `reuse` are stale and get overwritten
        self.cached = self.cached[:reuse]
        x = torch.tensor([ids[reuse:]], dtype=torch.long, device=device)  # (1, T)
        logits = self.model(x, kv_cache=self.cache)[:, -1]  # (1, V)
        self.cached += ids[reuse:]
        return logits

    @torch.no_grad()
    def stream(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_ids: Iterable[int] = (), generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield new token ids one by one. Stops after max_new_tokens, or before yielding a stop id (EOS,
        end of turn), or at the model's context length."""
        if not prompt_ids:
            raise UserError("empty prompt: give at least one token (the tokenizer may add none for empty text)")
        if len(prompt_ids) >= self.context:
            raise UserError(f"prompt of {len(prompt_ids)} tokens does not fit the model's context of "
                            f"{self.context}; shorten it (or /reset the chat)")
        self.model.eval()
        stop = set(stop_ids)
        device = self.model.lm_head.weight.device
        max_new_tokens = min(max_new_tokens, self.context - len(prompt_ids))
        seen = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, S) for the penalty
        if self.use_cache:
            logits = self._prefill(list(prompt_ids), len(prompt_ids) + max_new_tokens)
        for step in range(max_new_tokens):
            if not self.use_cache:  # the whole sequence every step: slow, the reference for the cache
                logits = self.model(seen)[:, -1]
            tok = next_token(logits, seen, sampling, generator)  # (1,)
            t = int(tok)
            if t in stop:
                return
            yield t
            seen = torch.cat([seen, tok[:, None]], dim=1)
            if self.use_cache and step + 1 < max_new_tokens:
                if getattr(self.model, "rope_switch", None) == len(self.cached):  # growing past it
                    logits = self._prefill(self.cached + [t], self.cache.max_len)  # as transformers' generate
                    continue
                logits = self.model(tok[:, None], kv_cache=self.cache)[:, -1]
                self.cached.append(t)


def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int,
             sampling: Sampling = Sampling(), stop_ids: Iterable[int] = (), seed: int | None = None,
             use_cache: bool = True) -> list[int]:
    """The new token ids for one prompt (stop ids excluded). A seed makes sampling reproducible."""
    generator = None
    if seed is not None and sampling.temperature > 0:
        generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    dec = Decoder(model, use_cache=use_cache)
    return list(dec.stream(prompt_ids, max_new_tokens, sampling, stop_ids, generator))


@torch.no_grad()
def greedy_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                 stop_ids: Iterable[int] = ()) -> list[list[int]]:
    """Greedy replies to prompts of equal length, decoded side by side: one forward pass per step for the
    whole group (no padding needed, so every row gets what `generate` gives it alone). A row that has
    stopped rides along until all have; its extra tokens are dropped."""
    T = len(prompts[0])
    if any(len(p) != T for p in prompts):
        raise ValueError("greedy_batch needs prompts of equal length (group them by length)")
    context = int(model.config.max_position_embeddings)
    if T == 0 or T >= context:
        raise UserError(f"prompt of {T} tokens does not fit the model's context of {context}")
    model.eval()
    stop = set(stop_ids)
    device = model.lm_head.weight.device
    max_new_tokens = min(max_new_tokens, context - T)
    cache = model.new_kv_cache(len(prompts), T + max_new_tokens)
    seqs = torch.tensor(prompts, dtype=torch.long, device=device)  # (B, T + step)
    logits = model(seqs, kv_cache=cache)[:, -1]  # (B, V)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        check_finite(logits)
        tok = logits.float().argmax(dim=-1)  # (B,)
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                done[b] = t in stop
                if not done[b]:
                    out[b].append(t)
        if all(done) or step + 1 == max_new_tokens:
            break
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
        if getattr(model, "rope_switch", None) == seqs.size(1) - 1:  # longrope switches: recompute every key
            cache.pos = 0
            logits = model(seqs, kv_cache=cache)[:, -1]
        else:
            logits = model(tok[:, None], kv_cache=cache)[:, -1]
    return out


def stop_ids_for(tokenizer, template: str | None = None) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS and end-of-turn ids, plus the end-of-turn markers
    the chosen template writes (a preset such as llama3 ends turns with <|eot_id|>, not EOS)."""
    ids = list(tokenizer.stop_token_ids)
    if template is not None:
        _, source = resolve_template(tokenizer, template)
        for tok in END_OF_TURN_TOKENS:
            i = tokenizer.token_to_id(tok)
            if tok in source and i is not None and i not in ids:
                ids.append(i)
    return ids


class TextStream:
    """Turns a stream of token ids into printable text pieces. Decoding the whole reply each time (not token
    by token) keeps multi-token characters and SentencePiece's leading spaces right; a piece ending in an
    incomplete UTF-8 character (U+FFFD) is held back until the next token completes it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed:], len(text)
        return piece

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def flush(self) -> str:
        text = self.text()
        piece, self.printed = text[self.printed:], len(text)
        return piece
