"""Evaluation: loss-bearing NLL and perplexity, exact-match accuracy, multiple-choice scoring.

NLL. A causal LM's logits at position t predict token t+1 (nanolisa/loss.py, the one loss of training and
evaluation); a label of IGNORE_INDEX (prompt tokens, padding) carries no loss. `nll` sums the cross-entropy over
exactly the tokens training takes loss on and counts them: the mean (total / count) is what transformers
reports as `.loss` and what LMFlow's benchmark calls the NLL per token; perplexity is exp of that mean.
The trainer uses the same function for its held-out loss.

Batching. The model has no padding mask, so examples are right-padded: with causal attention a real token
only ever attends to positions before it, never to the padding after it, so padding cannot change a real
token's logits, and its labels are IGNORE_INDEX. Examples are sorted by length first so a batch wastes little.

Accuracy. Greedy generation from each prompt, compared with the target after stripping whitespace; prompts
of equal length are decoded as one batch (no padding, so no mask needed).

Multiple choice. For {question, choices, answer}, each choice's log-likelihood as a continuation of
"Question: ...\\nAnswer:" is summed (the lm-evaluation-harness recipe); the prediction is the most likely
choice. `acc_norm` divides by the choice's length in characters first, which removes the bias toward short
answers.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Iterable, Sequence

import torch
from tqdm import tqdm

from nanolisa.errors import UserError
from nanolisa.generate import greedy_batch
from nanolisa.loss import IGNORE_INDEX, next_token_nll, shift_labels

Example = tuple[Sequence[int], Sequence[int]]  # (input_ids, labels)


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    """A tqdm bar on stderr when `progress` and stderr is a terminal; silent otherwise (disable=None), so logs
    and pipes get no carriage-return redraws."""
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, disable=None if progress else True)


# ----------------------------------------------------------------------------------------------------------
# NLL and perplexity


@torch.no_grad()
def example_nlls(model: torch.nn.Module, examples: Sequence[Example], batch_size: int = 8,
                 progress: bool = False) -> list[tuple[float, int]]:
    """(summed NLL, loss-token count) of each example, in the order given."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))  # longest first: OOM shows early
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    bar = progress_bar(len(examples), "nll", progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        T = max(len(examples[i][0]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)  # pad id 0: any valid id, its logits are never used
        labels = torch.full((len(idx), T), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = examples[i]
            ids[row, :len(x)] = torch.as_tensor(x, dtype=torch.long)
            labels[row, :len(y)] = torch.as_tensor(y, dtype=torch.long)
        ids, labels = ids.to(device), labels.to(device)
        sums = next_token_nll(model, ids, labels).tolist()  # (B,)
        counts = (shift_labels(labels) != IGNORE_INDEX).sum(dim=1).tolist()
        for row, i in enumerate(idx):
            out[i] = (sums[row], int(counts[row]))
        bar.update(len(idx))
    bar.close()
    model.train(was_training)
    return out


def nll(model: torch.nn.Module, examples: Sequence[Example], batch_size: int = 8,
        progress: bool = False) -> tuple[float, int]:
    """(total NLL over all loss-bearing tokens, number of such tokens). Mean NLL = total / count."""
    per = example_nlls(model, examples, batch_size, progress)
    return sum(s for s, _ in per), sum(n for _, n in per)


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean NLL); inf when that is past the largest float (a mean NLL above ~709 nats)."""
    if not n_tokens:
        return float("nan")
    try:
        return math.exp(total_nll / n_tokens)
    except OverflowError:
        return float("inf")


# ----------------------------------------------------------------------------------------------------------
# Exact-match accuracy


def exact_match(model: torch.nn.Module, tokenizer, prompts: Sequence[list[int]], targets: Sequence[str],
                max_new_tokens: int = 64, stop_ids: Iterable[int] | None = None, batch_size: int = 8,
                progress: bool = False) -> tuple[int, list[str]]:
    """(number correct, predictions): greedy replies compared with the targets after strip(). Prompts of
    equal length are decoded together, batch_size at a time (see generate.greedy_batch)."""
    stop = list(tokenizer.stop_token_ids if stop_ids is None else stop_ids)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    groups = [g[k:k + batch_size] for g in by_len.values() for k in range(0, len(g), batch_size)]
    preds = [""] * len(prompts)
    bar = progress_bar(len(prompts), "accuracy", progress)
    for group in groups:
        replies = greedy_batch(model, [list(prompts[i]) for i in group], max_new_tokens, stop)
        for i, ids in zip(group, replies):
            preds[i] = tokenizer.decode(ids, skip_special_tokens=True)
        bar.update(len(group))
    bar.close()
    correct = sum(p.strip() == t.strip() for p, t in zip(preds, targets))
    return correct, preds


# ----------------------------------------------------------------------------------------------------------
# Multiple choice by log-likelihood


def read_choice_file(path: str) -> list[dict]:
    """A jsonl of {"question": str, "choices": [str, ...], "answer": index | letter | choice text}."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read multiple-choice file ({e})") from None
    items = []
    for n, line in lines:
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg}); --metric choice wants one "
                            '{"question", "choices", "answer"} object per line') from None
        if not isinstance(d, dict) or not isinstance(d.get("question"), str) or \
                not isinstance(d.get("choices"), list) or len(d["choices"]) < 2 or \
                not all(isinstance(c, str) for c in d["choices"]) or "answer" not in d:
            raise UserError(f"{where}: need {{\"question\": str, \"choices\": [at least 2 strings], \"answer\": ...}}")
        items.append(dict(question=d["question"], choices=d["choices"],
                          answer=_answer_index(d["answer"], d["choices"], where)))
    if not items:
        raise UserError(f"{path}: no questions in the file")
    return items


def _answer_index(answer, choices: list[str], where: str) -> int:
    """The answer as an index: an int, a letter ("B"), or the text of one of the choices."""
    if isinstance(answer, bool):
        pass
    elif isinstance(answer, int) and 0 <= answer < len(choices):
        return answer
    elif isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.upper().isalpha() and ord(a.upper()) - ord("A") < len(choices):
            return ord(a.upper()) - ord("A")
        if answer in choices:
            return choices.index(answer)
    raise UserError(f"{where}: answer {answer!r} is not a choice index, letter or one of the choices")


def choice_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def continuation_example(tokenizer, context: str, continuation: str) -> Example:
    """(ids, labels) for context+continuation with loss only on the continuation. Whole string encoded once
    and split where the context ends, so tokens that merge across the boundary are scored as the model sees
    them (lm-evaluation-harness does the same)."""
    bos = [tokenizer.bos_token_id] if tokenizer.adds_bos else []
    ctx = bos + tokenizer.encode(context, add_special_tokens=False)
    whole = bos + tokenizer.encode(context + continuation, add_special_tokens=False)
    if whole[:len(ctx)] != ctx or len(whole) == len(ctx):
        whole = ctx + tokenizer.encode(continuation, add_special_tokens=False)
    return whole, [IGNORE_INDEX] * len(ctx) + whole[len(ctx):]


def score_choices(model: torch.nn.Module, tokenizer, items: Sequence[dict], batch_size: int = 8,
                  progress: bool = False, context: int | None = None) -> dict:
    """{"acc", "acc_norm", "n"} over the items (see read_choice_file). A question and choice longer than
    `context` tokens, or a score that is not finite, is a UserError: either would make the answer arbitrary."""
    examples = [continuation_example(tokenizer, choice_prompt(item["question"]), " " + choice)
                for item in items for choice in item["choices"]]
    question = [k for k, item in enumerate(items) for _ in item["choices"]]  # of each example
    for (ids, _), k in zip(examples, question):
        if context is not None and len(ids) > context:
            raise UserError(f"question {k + 1} with one of its choices is {len(ids)} tokens, longer than the "
                            f"model's context of {context}")
    per = example_nlls(model, examples, batch_size, progress)
    if not all(math.isfinite(s) for s, _ in per):
        raise UserError("a choice's log-likelihood is not finite: the model's logits are not finite numbers "
                        "(weights with NaN/inf, or fp16 overflow: try --dtype fp32)")
    acc = acc_norm = 0
    k = 0
    for item in items:
        n = len(item["choices"])
        logp = [-s for s, _ in per[k:k + n]]
        k += n
        norm = [lp / max(len(c) + 1, 1) for lp, c in zip(logp, item["choices"])]
        acc += max(range(n), key=lambda i: logp[i]) == item["answer"]
        acc_norm += max(range(n), key=lambda i: norm[i]) == item["answer"]
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}
