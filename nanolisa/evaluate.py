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

Multiple choice, as lm-evaluation-harness's `multiple_choice` tasks score it (lm_eval/api/task.py and
models/huggingface.py). Each line of the file is a document {question, choices, answer, ...}. Its context is
the prompt template rendered with the line's fields (lm-eval's `doc_to_text`; default ARC's
"Question: {{question}}\\nAnswer:"), each choice's continuation is the target delimiter (default " ") plus
the choice. The continuation's log-likelihood is summed over its tokens: the whole string is encoded once and
split where the context's own encoding ends (whitespace at the end of the context moves to the
continuation first), so tokens that merge across the boundary are scored as the model reads them; the
tokenizer adds its special tokens (BOS) as it does by default. The prediction is the most likely choice:
`acc`; `acc_norm` divides each log-likelihood by the choice's length in characters first, `acc_bytes` by its
length in UTF-8 bytes, both of which remove the bias toward short answers.

What a model was trained on. train.py writes training_args.json beside the model: the run's settings and
the held-out data of its training data's format (demo:conversation:test after --data demo:conversation,
--eval-data otherwise), paths made absolute. eval.py evaluates on that held-out data by default.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Iterable, Sequence

import jinja2
import jinja2.sandbox
import torch
from tqdm import tqdm

from nanolisa.errors import UserError
from nanolisa.files import read_json, write_json
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
    """A jsonl of {"question": str, "choices": [str, ...], "answer": index | letter | choice text}; other
    fields are kept (in "fields", with these) for a --choice-prompt that names them."""
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
        if not isinstance(d, dict) or not isinstance(d.get("choices"), list) or len(d["choices"]) < 2 or \
                not all(isinstance(c, str) for c in d["choices"]) or "answer" not in d:
            raise UserError(f"{where}: need {{\"question\": str, \"choices\": [at least 2 strings], \"answer\": ...}}")
        items.append(dict(question=d.get("question"), choices=d["choices"], fields=d,
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


DEFAULT_CHOICE_PROMPT = "Question: {{question}}\nAnswer:"  # lm-eval's ARC doc_to_text
DEFAULT_DELIMITER = " "  # lm-eval's target_delimiter


def choice_contexts(items: Sequence[dict], prompt: str, path: str) -> list[str]:
    """Each document's context: `prompt`, a Jinja template over the document's fields (lm-eval's doc_to_text,
    rendered as lm-eval renders it: undefined fields are errors, a trailing newline is kept), sandboxed."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        template = env.from_string(prompt)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"--choice-prompt does not parse as a Jinja template: {e.message}") from None
    out = []
    for n, item in enumerate(items, 1):
        try:
            out.append(template.render(**item["fields"]))
        except jinja2.TemplateError as e:
            raise UserError(f"{path}: question {n}: --choice-prompt cannot be rendered ({e})") from None
    return out


def continuation_example(tokenizer, context: str, continuation: str) -> Example:
    """(ids, labels) for context+continuation with loss only on the continuation, as lm-eval's _encode_pair:
    whitespace ending the context moves to the continuation; context+continuation is encoded once and the
    continuation is what lies past the length of the context's own encoding (tokens that merge across the
    boundary are scored as the model reads them). The tokenizer adds its special tokens (BOS) as it does by
    default; an empty context is the BOS (else EOS) token alone."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context:
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx):]
    else:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx, cont = [prefix], tokenizer.encode(continuation)
    return ctx + cont, [IGNORE_INDEX] * len(ctx) + cont


def score_choices(model: torch.nn.Module, tokenizer, items: Sequence[dict], batch_size: int = 8,
                  progress: bool = False, context: int | None = None, prompt: str = DEFAULT_CHOICE_PROMPT,
                  delimiter: str = DEFAULT_DELIMITER, path: str = "--data") -> dict:
    """{"acc", "acc_norm", "acc_bytes", "n"} over the items (see read_choice_file). A question and choice
    longer than `context` tokens, a choice of no tokens or a score that is not finite is a UserError: each
    would make the answer arbitrary."""
    contexts = choice_contexts(items, prompt, path)
    examples = [continuation_example(tokenizer, ctx, delimiter + choice)
                for ctx, item in zip(contexts, items) for choice in item["choices"]]
    question = [k for k, item in enumerate(items) for _ in item["choices"]]  # of each example
    for (ids, labels), k in zip(examples, question):
        if context is not None and len(ids) > context:
            raise UserError(f"question {k + 1} with one of its choices is {len(ids)} tokens, longer than the "
                            f"model's context of {context}")
        if all(y == IGNORE_INDEX for y in labels):
            raise UserError(f"{path}: question {k + 1}: a choice encodes to no tokens of its own")
    per = example_nlls(model, examples, batch_size, progress)
    if not all(math.isfinite(s) for s, _ in per):
        raise UserError("a choice's log-likelihood is not finite: the model's outputs are not finite (NaN or "
                        "infinite logits: weights with NaN/inf, or fp16 overflow: try --dtype fp32)")
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    k = 0
    for item in items:
        choices, n = item["choices"], len(item["choices"])
        logp = [-s for s, _ in per[k:k + n]]
        k += n
        # lm-eval divides by the choice's length without the delimiter; a choice of "" counts as 1
        scores = {"acc": logp,
                  "acc_norm": [lp / max(len(c), 1) for lp, c in zip(logp, choices)],
                  "acc_bytes": [lp / max(len(c.encode("utf-8")), 1) for lp, c in zip(logp, choices)]}
        for name, score in scores.items():
            hits[name] += max(range(n), key=lambda i: score[i]) == item["answer"]
    return {**{name: h / len(items) for name, h in hits.items()}, "n": len(items)}


# ----------------------------------------------------------------------------------------------------------
# What a model was trained on


TRAINING_ARGS = "training_args.json"


def _absolute(path: str | None) -> str | None:
    """A path that resolves from any directory; demo names and presets stay names."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def write_training_args(out_dir: str, settings: dict, held_out: str | None) -> None:
    """training_args.json in out_dir: the run's settings and its held-out data (None: the run had none), with
    the paths of the model and the data made absolute, so eval.py finds them from any directory."""
    record = dict(settings)
    for key in ("model", "data", "eval_data", "out", "log"):
        record[key] = _absolute(record.get(key))
    write_json(os.path.join(out_dir, TRAINING_ARGS), {**record, "held_out_data": _absolute(held_out)})


def training_args(model_dir: str) -> dict | None:
    """The training_args.json train.py wrote beside a model, or None where there is none."""
    path = os.path.join(model_dir, TRAINING_ARGS)
    if not os.path.isfile(path):
        return None
    record = read_json(path)
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a JSON object")
    return record
