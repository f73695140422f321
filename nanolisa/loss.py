"""The loss: next-token cross-entropy over the loss-bearing tokens, one function for training and evaluation.

Labels are aligned with input_ids (the Hugging Face convention): labels[b, t] is the token at position t,
or IGNORE_INDEX where that token takes no loss (prompt, padding). The model's output at position t predicts
the token at t+1, so the *labels* are shifted one to the left against the outputs:

    targets[b, t] = labels[b, t + 1]        (the last position predicts nothing: IGNORE_INDEX)

Shifting the labels, not the logits, matters for memory: `logits[:, :-1]` followed by a reshape copies the
whole (B, T, V) logits, which at a 128k vocabulary is the largest tensor of a training step. With
`nanolisa.kernels.use_kernels` (the trainer's default) those logits are not built at all: `next_token_nll`
hands the hidden states to a chunked linear + cross-entropy (kernels/linear_cross_entropy.py).

The sums are returned with their token counts, never as means: a training step divides by the number of
loss-bearing tokens of the *whole* step (all micro-batches), so gradient accumulation equals one big batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

IGNORE_INDEX = -100  # the label of a token that takes no loss (torch's cross_entropy and transformers agree)


def shift_labels(labels: Tensor) -> Tensor:
    """labels (B, T) aligned with the inputs -> targets (B, T) aligned with the outputs."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def count_loss_tokens(labels: Tensor) -> int:
    """How many targets of labels (B, T) take a loss (the first position of each row never does)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def head_nll(hidden: Tensor, head: torch.nn.Module, targets: Tensor, softcap: float | None = None) -> Tensor:
    """The LM head and the loss, the plain way: hidden (B, T, C) -> logits (B, T, V) -> NLL of each
    position (B, T), fp32, 0 where the target is IGNORE_INDEX. targets (B, T) are already shifted.
    softcap: logits -> softcap * tanh(logits / softcap) first (Gemma 2's final-logit soft-capping).
    The model's default `head_loss`; nanolisa.kernels swaps in one that never builds the full logits."""
    logits = head(hidden)  # (B, T, V)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B*T,)
    return nll.view(targets.shape)  # (B, T)


def next_token_nll(model: torch.nn.Module, input_ids: Tensor, labels: Tensor,
                   position_ids: Tensor | None = None) -> Tensor:
    """Run the model and return the summed next-token NLL of each row, (B,) fp32.

    The targets go into the model's forward, which computes the loss from the hidden states with its
    `head_loss` and sums each row: with nanolisa.kernels' fused linear + cross-entropy (the trainer's and
    eval.py's default) the (B, T, V) logits never exist in full. Going through forward (not a side door)
    keeps the hooks of DDP and FSDP2 wrappers working."""
    return model(input_ids, position_ids=position_ids, targets=shift_labels(labels))  # (B,)
