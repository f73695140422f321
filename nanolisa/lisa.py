"""LISA: Layerwise Importance Sampled AdamW (Pan et al., 2024, arXiv 2403.17919, Algorithm 1).

The observation behind LISA (paper Sec. 3.1): during LoRA training the per-layer weight-norm changes are
heavily skewed -- the embedding and the LM head move a lot, the middle blocks little. LISA therefore trains
the embedding and head ALWAYS, and only gamma of the L transformer blocks at a time, re-sampled uniformly
every K steps:

    for i in 0 .. T/K - 1:
        freeze all blocks                           (embedding + head stay trainable)
        sample gamma of the L blocks uniformly, without replacement, and unfreeze them
        run AdamW for K steps

Why it saves memory, compared with full fine-tuning of the same model:
  * Only the gamma active blocks (+ embedding and head) hold a .grad and AdamW state (m, v): 3 extra
    copies of their weights. The L - gamma frozen blocks hold none of that -- which is most of the model.
  * Frozen blocks compute no weight gradients. Backward still flows THROUGH them (the activation gradient
    dL/dx is needed to reach earlier active blocks and the embedding), but the dL/dW matmuls -- half the
    backward cost of a linear layer -- are skipped, and no gradient buffers are allocated for them.
  * The memory bill therefore looks like LoRA's (for small gamma), yet every weight of the model can change
    over the run, which is why LISA matches or beats full fine-tuning in much of the paper's experiments.

Beyond uniform sampling (`sampling=`). The paper samples the middle blocks uniformly and leaves better
importance sampling open; later work samples by gradient or weight statistics. Three policies, each
drawing gamma distinct blocks at every switch:
  * "uniform"  (default) every block alike: Algorithm 1 as published.
  * "weighted" fixed per-block probabilities p_i (`probs`, normalised).
  * "gradnorm" p_i ~ a running estimate g_i of block i's gradient norm, mixed with uniform so that every
    block keeps being visited:  p_i = (1 - f) * g_i / sum_j g_j + f / L,  f = GRADNORM_FLOOR.
    g_i is measured only while block i is active, where its gradient exists anyway (`measure`, one
    norm per active block per step, summed on the device; read back once per switch), then folded in
    as an exponential moving average over the block's visits. A block not yet measured counts as the
    largest estimate so far, so it is tried early. The gradient norm is that of the whole step (after
    gradient accumulation, before clipping), the global one over every rank's shard under FSDP2.
The non-uniform draws pick one block after another, each with probability proportional to its weight
among the blocks not yet picked (as torch.multinomial(replacement=False) does), so for gamma > 1 a block's
chance of being in the set is not exactly p_i; for gamma = 1 it is.

Two failure modes of LMFlow's LISA callback that this design rules out (tests/test_lisa.py covers both):
  (a) state of deactivated layers was never freed, so memory crept up to full fine-tuning (LMFlow issues
      729, 768). Here every switch calls `optimizer.release(frozen params)` and nanolisa's AdamW also drops
      the state of any frozen parameter at each step().
  (b) the optimizer was built from the parameters trainable at start-up, so layers unfrozen later were
      never updated (LMFlow issue 726). Here the optimizer is built over ALL parameters; AdamW skips those
      with requires_grad=False or no grad and lazily creates fresh state (step 0) for newly active ones,
      as a fresh optimizer for the new layers would.

The schedule comes from LISA's own seeded `random.Random`, never the global RNG: it is identical on every
data-parallel rank and independent of data order and dropout. gradnorm's estimates are identical on every
rank too: under DDP the gradients already are, under FSDP2 one small all-reduce sums the shards' squared
norms. `state_dict()` stores the RNG, the estimates and the norms measured since the last switch (plain
JSON numbers), so a resumed run continues the exact same schedule. LISA works on module objects
(`model.blocks[i]`), not on parameter names, so wrapper prefixes (DDP `module.`, torch.compile
`_orig_mod.`, activation-checkpoint wrappers) do not matter. Distributed: shard each block as its own FSDP
unit, so a unit is wholly frozen or wholly trainable. DDP registers only the parameters that require grad
when it is built, so the trainer rebuilds the DDP wrapper after each switch, over the blocks that train
now (nanolisa/parallel.py `replicate`; a rebuild moves no weights): no find_unused_parameters, and no
gradient buckets for frozen blocks.

Usage (call before the forward pass of each optimizer step, i.e. at gradient-accumulation boundaries):

    lisa = LISA(model, n_layers=2, interval=20, seed=0)      # sampling="gradnorm" for importance sampling
    opt = AdamW(model.parameters(), lr=1e-5)        # over ALL parameters
    for step in range(max_steps):
        lisa.maybe_switch(step, opt)
        loss = ...; loss.backward()
        lisa.measure()                              # gradnorm only (a no-op otherwise): before clipping
        opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import logging
import math
import random

import torch
import torch.distributed as dist
import torch.nn as nn

from nanolisa.errors import UserError
from nanolisa.model import unwrap
from nanolisa.parallel import is_sharded, local

log = logging.getLogger(__name__)

SAMPLING = ("uniform", "weighted", "gradnorm")
GRADNORM_FLOOR = 0.25  # gradnorm: this share of the probability is spread evenly, so p_i >= FLOOR / L
GRADNORM_DECAY = 0.5  # gradnorm: g_i <- DECAY * g_i + (1 - DECAY) * (mean norm over block i's latest visit)


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def draw(rng: random.Random, weights: list[float], k: int) -> list[int]:
    """k distinct indices, picked one after another, each with probability proportional to its weight among
    those not yet picked (indices of weight 0 never). One rng.random() per pick, so the draw is a function
    of the RNG's state alone."""
    left = [i for i, w in enumerate(weights) if w > 0]
    picked = []
    for _ in range(k):
        u = rng.random() * sum(weights[i] for i in left)
        pick = left[-1]  # if rounding leaves u >= 0 after every subtraction
        for i in left:
            u -= weights[i]
            if u < 0:
                pick = i
                break
        picked.append(pick)
        left.remove(pick)
    return picked


class LISA:
    def __init__(self, model: nn.Module, n_layers: int, interval: int, seed: int = 0,
                 train_embeddings: bool = True, train_head: bool = True, sampling: str = "uniform",
                 probs: list[float] | None = None):
        # Keep the model, not a list of its parameters: wrapping the model after this point (FSDP swaps
        # in sharded Parameters) must not leave LISA toggling stale tensors. Parameters are looked up
        # from the module objects at each switch.
        self.model = unwrap(model)
        L = len(self.model.blocks)
        if not 0 <= n_layers <= L:
            raise UserError(f"LISA n_layers={n_layers} is out of range: the model has {L} blocks, "
                            f"choose between 0 and {L}")
        if interval < 1:
            raise UserError(f"LISA interval={interval} must be at least 1 "
                            "(the number of optimizer steps between layer switches)")
        self.n_layers, self.interval, self.seed = n_layers, interval, seed
        self.train_embeddings, self.train_head = train_embeddings, train_head
        self.sampling, self.probs = sampling, self._check_sampling(sampling, probs, L, n_layers)
        self.rng = random.Random(seed)  # LISA's own RNG: same schedule on every rank, whatever else draws
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []  # (step, active blocks) at each switch
        # gradnorm: the running estimate g_i per block (None until measured), and the norms measured since
        # the last switch, summed per block on the gradients' device with how many steps they cover.
        self.estimate: list[float | None] = [None] * L
        self.norm_sum: torch.Tensor | None = None  # (L,)
        self.norm_steps: torch.Tensor | None = None  # (L,)
        self._apply(None)  # until the first switch only the embedding and head are trainable

    @staticmethod
    def _check_sampling(sampling: str, probs: list[float] | None, L: int, n_layers: int) -> list[float] | None:
        """The policy's name, and for "weighted" its probabilities, normalised."""
        if sampling not in SAMPLING:
            raise UserError(f"unknown LISA sampling {sampling!r}: choose one of {', '.join(SAMPLING)}")
        if sampling != "weighted":
            if probs is not None:
                raise UserError(f"LISA probabilities are for weighted sampling, not {sampling}")
            return None
        if probs is None or len(probs) != L:
            raise UserError(f"weighted LISA sampling needs one probability per block (--lisa-probs): the model "
                            f"has {L} blocks, got {0 if probs is None else len(probs)}")
        if not all(math.isfinite(p) and p >= 0 for p in probs) or sum(p > 0 for p in probs) < n_layers:
            raise UserError(f"LISA probabilities (--lisa-probs) must be >= 0 with at least {n_layers} (the "
                            f"number of active blocks) above 0, got {probs}")
        return [p / sum(probs) for p in probs]

    def maybe_switch(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """At step % interval == 0 (or on the first call) sample a new set of active blocks.

        Returns True if the active set was re-sampled. Frozen parameters get .grad = None and their
        optimizer state is released; newly active ones get fresh state at their first optimizer step.
        Calling it twice for the same step draws once, so a resumed run can repeat its first call.
        """
        if self.history and (step % self.interval != 0 or self.history[-1][0] == step):
            return False
        self._fold()
        self.active = sorted(self._sample())
        self.history.append((step, list(self.active)))
        self._apply(optimizer)
        log.info("LISA step %d: active blocks %s", step, self.active)
        return True

    def _sample(self) -> list[int]:
        L = len(self.model.blocks)
        if self.sampling == "uniform":
            return self.rng.sample(range(L), self.n_layers)  # Algorithm 1, as published
        return draw(self.rng, self.probs if self.sampling == "weighted" else self.gradnorm_probs(), self.n_layers)

    def gradnorm_probs(self) -> list[float]:
        """p_i = (1 - f) * g_i / sum_j g_j + f / L, a block not yet measured counting as the largest g."""
        L = len(self.estimate)
        known = [g for g in self.estimate if g is not None]
        g = [max(known, default=1.0) if e is None else e for e in self.estimate]
        total = sum(g)
        if total <= 0:
            return [1 / L] * L
        return [(1 - GRADNORM_FLOOR) * gi / total + GRADNORM_FLOOR / L for gi in g]

    @torch.no_grad()
    def measure(self) -> None:
        """gradnorm: add each active block's gradient norm to the sums of this interval; a no-op for the
        other policies. Call once per optimizer step, after backward (and GradScaler.unscale_), before
        clipping. Stays on the device: nothing is read back until the next switch. A non-finite norm (a step
        the fp16 GradScaler skips) is not counted."""
        if self.sampling != "gradnorm":
            return
        grads = [[p.grad for p in self.model.blocks[i].parameters() if p.grad is not None] for i in self.active]
        if not any(grads):
            return
        device = next(g for gs in grads for g in gs).device
        zero = torch.zeros((), device=device)
        sq = torch.stack([sum((torch.linalg.vector_norm(local(g), dtype=torch.float32).square() for g in gs), zero)
                          for gs in grads])  # (gamma,) squared norms
        if any(is_sharded(g) for gs in grads for g in gs):
            dist.all_reduce(sq)  # FSDP2: each rank holds a shard of every gradient; their squares add up
        norms = sq.sqrt()
        ok = torch.isfinite(norms)
        if self.norm_sum is None:
            self.norm_sum = torch.zeros(len(self.estimate), device=device)
            self.norm_steps = torch.zeros(len(self.estimate), device=device)
        self.norm_sum, self.norm_steps = self.norm_sum.to(device), self.norm_steps.to(device)
        idx = torch.tensor(self.active, device=device)
        self.norm_sum.index_add_(0, idx, torch.where(ok, norms, torch.zeros_like(norms)))
        self.norm_steps.index_add_(0, idx, ok.float())

    def _fold(self) -> None:
        """At a switch: fold the mean norm each block showed over the interval into its estimate g_i."""
        if self.norm_sum is None:
            return
        for i, (total, n) in enumerate(zip(self.norm_sum.tolist(), self.norm_steps.tolist())):
            if n:
                mean, g = total / n, self.estimate[i]
                self.estimate[i] = mean if g is None else GRADNORM_DECAY * g + (1 - GRADNORM_DECAY) * mean
        self.norm_sum = self.norm_steps = None

    def _apply(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Set requires_grad from `self.active`; drop grads and optimizer state of everything frozen."""
        m = self.model
        blocks, embed, head = list(m.blocks), list(m.embed_modules), list(m.head_modules)
        # Trainable = always-on parts + the sampled blocks. A set of ids, because with tied embeddings the
        # embedding and the LM head share one Parameter: it is trainable if either side is.
        always = (embed if self.train_embeddings else []) + (head if self.train_head else [])
        trainable = {id(p) for p in _params(always + [blocks[i] for i in self.active])}
        # Every parameter LISA manages (anything else in the model is left as the caller set it).
        managed = {id(p): p for p in _params(blocks + embed + head)}.values()
        frozen = []
        for p in managed:
            p.requires_grad_(id(p) in trainable)
            if id(p) not in trainable:
                p.grad = None  # frees the gradient buffer now, not at the next zero_grad
                frozen.append(p)
        if optimizer is not None:
            release = getattr(optimizer, "release", None)
            if release is not None:  # nanolisa.adamw.AdamW
                release(frozen)
            else:  # any torch optimizer: its state is a dict keyed by parameter
                for p in frozen:
                    optimizer.state.pop(p, None)

    def state_dict(self) -> dict:
        """Plain JSON types (a resume checkpoint's trainer_state.json holds it)."""
        version, internal, gauss = self.rng.getstate()
        pending = None if self.norm_sum is None else [self.norm_sum.tolist(), self.norm_steps.tolist()]
        return {"seed": self.seed, "rng_state": [version, list(internal), gauss],
                "active": list(self.active), "history": [[s, list(a)] for s, a in self.history],
                "estimate": list(self.estimate), "pending_norms": pending}

    def load_state_dict(self, sd: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        version, internal, gauss = sd["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.seed = sd["seed"]
        self.active = [int(i) for i in sd["active"]]
        self.history = [(int(s), [int(i) for i in a]) for s, a in sd["history"]]
        self.estimate = list(sd.get("estimate") or [None] * len(self.model.blocks))
        pending = sd.get("pending_norms")  # float32 values as JSON doubles: restored exactly
        self.norm_sum, self.norm_steps = (None, None) if pending is None else \
            (torch.tensor(pending[0], dtype=torch.float32), torch.tensor(pending[1], dtype=torch.float32))
        self._apply(optimizer)
