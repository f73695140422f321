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

Two failure modes of LMFlow's LISA callback that this design rules out (tests/test_lisa.py covers both):
  (a) state of deactivated layers was never freed, so memory crept up to full fine-tuning (LMFlow issues
      729, 768). Here every switch calls `optimizer.release(frozen params)` and nanolisa's AdamW also drops
      the state of any frozen parameter at each step().
  (b) the optimizer was built from the parameters trainable at start-up, so layers unfrozen later were
      never updated (LMFlow issue 726). Here the optimizer is built over ALL parameters; AdamW skips those
      with requires_grad=False or no grad and lazily creates fresh state (step 0) for newly active ones,
      as a fresh optimizer for the new layers would.

The schedule comes from LISA's own seeded `random.Random`, never the global RNG: it is identical on every
data-parallel rank and independent of data order and dropout. `state_dict()` stores that RNG, so a resumed
run continues the exact same schedule. LISA works on module objects (`model.blocks[i]`), not on parameter
names, so wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`, activation-checkpoint wrappers)
do not matter. Distributed: shard each block as its own FSDP unit, so a unit is wholly frozen or wholly
trainable. DDP registers only the parameters that require grad when it is built: wrap BEFORE creating
LISA and pass find_unused_parameters=True (DDP still keeps gradient buckets for every parameter).

Usage (call before the forward pass of each optimizer step, i.e. at gradient-accumulation boundaries):

    lisa = LISA(model, n_layers=2, interval=20, seed=0)
    opt = AdamW(model.parameters(), lr=1e-5)        # over ALL parameters
    for step in range(max_steps):
        lisa.maybe_switch(step, opt)
        loss = ...; loss.backward(); opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import logging
import random

import torch
import torch.nn as nn

from nanolisa.errors import UserError
from nanolisa.model import unwrap

log = logging.getLogger(__name__)


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


class LISA:
    def __init__(self, model: nn.Module, n_layers: int, interval: int, seed: int = 0,
                 train_embeddings: bool = True, train_head: bool = True):
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
        self.rng = random.Random(seed)  # LISA's own RNG: same schedule on every rank, whatever else draws
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []  # (step, active blocks) at each switch
        self._apply(None)  # until the first switch only the embedding and head are trainable

    def maybe_switch(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """At step % interval == 0 (or on the first call) sample a new set of active blocks.

        Returns True if the active set was re-sampled. Frozen parameters get .grad = None and their
        optimizer state is released; newly active ones get fresh state at their first optimizer step.
        Calling it twice for the same step draws once, so a resumed run can repeat its first call.
        """
        if self.history and (step % self.interval != 0 or self.history[-1][0] == step):
            return False
        self.active = sorted(self.rng.sample(range(len(self.model.blocks)), self.n_layers))
        self.history.append((step, list(self.active)))
        self._apply(optimizer)
        log.info("LISA step %d: active blocks %s", step, self.active)
        return True

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
        version, internal, gauss = self.rng.getstate()
        return {"seed": self.seed, "rng_state": [version, list(internal), gauss],
                "active": list(self.active), "history": [[s, list(a)] for s, a in self.history]}

    def load_state_dict(self, sd: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        version, internal, gauss = sd["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.seed = sd["seed"]
        self.active = [int(i) for i in sd["active"]]
        self.history = [(int(s), [int(i) for i in a]) for s, a in sd["history"]]
        self._apply(optimizer)
