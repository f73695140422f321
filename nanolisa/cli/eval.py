"""Evaluate a model: NLL per token and perplexity, exact-match accuracy, or multiple-choice accuracy.
(`nanolisa eval ...` runs the same code as `python eval.py ...`.)

    python eval.py                                       # NLL/perplexity of the built-in tiny model on demo:test
    python eval.py --model out                           # ... of the model `python train.py` fine-tuned, on
                                                         # the held-out split of the data it was trained on
    python eval.py --model out --metric accuracy         # greedy replies vs the held-out answers (exact match)
    python eval.py --model out --data demo:conversation:test   # the demo's held-out split in the chat format
    python eval.py --model path/to/llama --lora out --data held_out.json --json
    python eval.py --model path/to/llama --metric choice --data arc.jsonl   # {question, choices, answer}

--metric nll (default) scores exactly the tokens training takes loss on (outputs / assistant turns; for
text_only data every token after the first), reading --data the way train.py does: LMFlow's benchmark
metric. --metric accuracy generates greedily from each prompt (text2text: the input; conversation: the
conversation up to its last assistant turn) and compares with the expected answer after stripping spaces.
--metric choice scores each line of a jsonl {"question": ..., "choices": [...], "answer": index, letter or
choice text} as lm-evaluation-harness's multiple_choice tasks do. The context is --choice-prompt, a Jinja
template over the line's fields (lm-eval's doc_to_text; default ARC's "Question: {{question}}\\nAnswer:");
each choice follows it after --choice-delimiter (lm-eval's target_delimiter, default " "); the most likely
choice is the answer: accuracy (summed log-likelihood), accuracy_norm (divided by the choice's length in
characters: lm-eval's acc_norm) and accuracy_bytes (in UTF-8 bytes: lm-eval's acc_bytes). Give the prompt
format your model was tuned to: on one it does not know, a model can score near chance.

Without --data, eval.py evaluates a model train.py wrote on the held-out data of what it was trained on
(training_args.json beside the model: demo:test after the demo, demo:conversation:test after
--data demo:conversation, --eval-data after your own data), and the built-in tiny model on demo:test; for
any other model (or a run without held-out data) it asks for --data rather than guess.
A LoRA adapter directory with tokenizer files (train.py writes them) brings its own chat template, the one
it was trained with. Single process; CPU or one GPU.

Nothing is scored past the model's context (max_position_embeddings): a --seq-len longer than it, or a
question that does not fit, is an error, as in chat.py. The --json line is strict JSON: a score that is
not a finite number (NaN or infinite logits, e.g. fp16 overflow or broken weights) is an error with exit
status 2, never `NaN` in the output: strict parsers reject NaN, and a NaN perplexity says nothing about
the model that the error does not. (A finite NLL whose perplexity is past the largest float, a mean above
~709 nats per token, reports "ppl": null.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from nanolisa.cli.common import (ArgumentParser, add_model_args, add_runtime_args, describe_template,
                                 load_for_inference, run_cli)
from nanolisa.data import read_dataset, tokenize_dataset
from nanolisa.errors import UserError
from nanolisa.evaluate import (DEFAULT_CHOICE_PROMPT, DEFAULT_DELIMITER, TRAINING_ARGS, exact_match, nll, perplexity,
                               read_choice_file, score_choices, training_args)
from nanolisa.generate import stop_ids_for
from nanolisa.presets import PRESETS as MODEL_PRESETS
from nanolisa.runtime import set_threads
from nanolisa.templates import PRESETS, render_chat, unknown_markers_note

METRICS = ("nll", "accuracy", "choice")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", default=None,
                   help="evaluation data in any format train.py reads, or the demo's held-out splits: "
                        "'demo:test' (text2text, what `make demo` trains on) and 'demo:conversation:test' (the "
                        "chat format); for --metric choice a jsonl of {question, choices, answer}. Default: the "
                        f"held-out data of what the model was trained on ({TRAINING_ARGS} beside it), demo:test "
                        "for the tiny preset; choice: required")
    p.add_argument("--metric", default="nll", choices=METRICS,
                   help="nll: NLL per loss-bearing token and perplexity; accuracy: exact match of greedy "
                        "replies; choice: multiple choice by log-likelihood (default: %(default)s)")
    p.add_argument("--template", default=None,
                   help=f"chat template for conversation data (a preset: {', '.join(PRESETS)}; a .jinja file "
                        "or Jinja string); default: the model's own (a LoRA adapter's own if it has one: the "
                        "one it was trained with)")
    p.add_argument("--train-on-prompt", action="store_true",
                   help="nll: score prompts / user turns too (match train.py's flag)")
    p.add_argument("--seq-len", type=int, default=256,
                   help="nll: longer examples are truncated, as train.py --seq-len does; use the same value "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="examples per forward pass; accuracy decodes prompts of equal length together "
                        "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="accuracy: most tokens per generated answer (default: %(default)s)")
    p.add_argument("--choice-prompt", default=DEFAULT_CHOICE_PROMPT,
                   help="choice: the context of each question, a Jinja template over the line's fields "
                        "(lm-eval's doc_to_text; write \\n for a newline) (default: %(default)r)")
    p.add_argument("--choice-delimiter", default=DEFAULT_DELIMITER,
                   help="choice: what goes between the context and each choice (lm-eval's target_delimiter) "
                        "(default: %(default)r)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples / questions")
    p.add_argument("--json", action="store_true", help="print one JSON line of results to stdout")
    add_runtime_args(p)
    args = p.parse_args(argv)
    for flag in ("seq_len", "batch_size", "max_new_tokens", "limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            p.error(f"--{flag.replace('_', '-')} {v}: must be >= 1")
    if args.data is None and args.metric == "choice":
        p.error("--metric choice needs --data FILE.jsonl with {question, choices, answer} lines")
    args.choice_prompt = args.choice_prompt.replace("\\n", "\n")
    return args


def default_data(args) -> str:
    """--data when it is not given: the held-out data train.py recorded beside the model, demo:test for the
    tiny preset, and otherwise an error rather than a guess."""
    where = args.lora or args.model
    if where in MODEL_PRESETS and not os.path.isdir(where):
        return "demo:test"
    record = training_args(where) if os.path.isdir(where) else None
    if record is None:
        raise UserError(f"--data: {where} has no {TRAINING_ARGS} (train.py's record of what it trained on) to "
                        f"take held-out data from; give --data FILE (or demo:test, demo:conversation:test)")
    held_out = record.get("held_out_data")
    if not held_out:
        raise UserError(f"--data: {where} was trained on {record.get('data')} without held-out data "
                        f"(train.py --eval-data); give --data FILE")
    print(f"note: evaluating on {held_out}, the held-out data of what {where} was trained on "
          f"({os.path.join(where, TRAINING_ARGS)}; --data overrides it)", file=sys.stderr)
    return held_out


# ----------------------------------------------------------------------------------------------------------


def context_of(model) -> int:
    return int(model.config.max_position_embeddings)


def eval_nll(model, tokenizer, args) -> dict:
    if args.seq_len > context_of(model):
        raise UserError(f"--seq-len {args.seq_len} is longer than the model's context of {context_of(model)} "
                        f"positions (max_position_embeddings); use --seq-len {context_of(model)} or less")
    ds = read_dataset(args.data)
    template_notes(ds, tokenizer, args)
    data = tokenize_dataset(ds, tokenizer, seq_len=args.seq_len, template=args.template,
                            train_on_prompt=args.train_on_prompt)
    print(f"note: {data.summary()}", file=sys.stderr)
    examples = data.examples[:args.limit]
    total, n = nll(model, examples, args.batch_size, progress=True)
    if n == 0:
        raise UserError(f"{args.data}: no loss-bearing tokens to score (are the outputs empty?)")
    if not math.isfinite(total):
        raise UserError(f"the NLL on {args.data} is {total}: the model's logits are not finite numbers "
                        f"(weights with NaN/inf, or fp16 overflow: try --dtype fp32)")
    ppl = perplexity(total, n)  # past the largest float for a mean NLL above ~709: null in the JSON
    return {"nll": total / n, "ppl": ppl if math.isfinite(ppl) else None, "tokens": n, "examples": len(examples),
            "records": data.counts()}


def accuracy_pairs(ds, tokenizer, template: str | None) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, expected answer) for each held-out example: exactly what the model was trained to see
    before the answer."""
    prompts, targets = [], []
    if ds.type == "text2text":
        # as data.py tokenizes text2text: the input with the tokenizer's special tokens but never its EOS
        for inst in ds.instances:
            ids = tokenizer.encode(inst["input"], add_special_tokens=True)
            if tokenizer.adds_eos and ids and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
            prompts.append(ids)
            targets.append(inst["output"])
    elif ds.type == "conversation":
        for inst in ds.instances:
            messages = ([{"role": "system", "content": inst["system"]}] if "system" in inst else []) + \
                inst["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")  # data.py checks it exists
            text = render_chat(messages[:last], tokenizer, template, add_generation_prompt=True,
                               tools=inst.get("tools"))
            prompts.append(tokenizer.encode(text, add_special_tokens=False))  # the template writes any BOS
            targets.append(messages[last]["content"])
    else:
        raise UserError(f"{ds.source}: --metric accuracy needs text2text or conversation data (this is "
                        f"{ds.type}); use --metric nll")
    return prompts, targets


def template_notes(ds, tokenizer, args) -> None:
    """For conversation data: which chat template renders it, and a template's markers the tokenizer lacks."""
    if ds.type != "conversation":
        return
    print(f"note: chat template: {describe_template(tokenizer, args.template, args.tokenizer_dir)}",
          file=sys.stderr)
    markers = unknown_markers_note(tokenizer, args.template)
    if markers:
        print(f"note: {markers}", file=sys.stderr)


def eval_accuracy(model, tokenizer, args) -> dict:
    ds = read_dataset(args.data)
    template_notes(ds, tokenizer, args)
    prompts, targets = accuracy_pairs(ds, tokenizer, args.template)
    prompts, targets = prompts[:args.limit], targets[:args.limit]
    stop = stop_ids_for(tokenizer, args.template)
    correct, _ = exact_match(model, tokenizer, prompts, targets, args.max_new_tokens, stop, args.batch_size,
                             progress=True)
    return {"accuracy": correct / len(prompts), "correct": correct, "examples": len(prompts)}


def eval_choice(model, tokenizer, args) -> dict:
    items = read_choice_file(args.data)[:args.limit]
    print(f"note: each question is scored as {args.choice_prompt!r} (--choice-prompt), then "
          f"{args.choice_delimiter!r} (--choice-delimiter) and the choice", file=sys.stderr)
    r = score_choices(model, tokenizer, items, args.batch_size, progress=True, context=context_of(model),
                      prompt=args.choice_prompt, delimiter=args.choice_delimiter, path=args.data)
    return {"accuracy": r["acc"], "accuracy_norm": r["acc_norm"], "accuracy_bytes": r["acc_bytes"],
            "examples": r["n"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.data is None:
        args.data = default_data(args)  # before loading the model: a refusal comes at once
    model, tokenizer, args.tokenizer_dir = load_for_inference(args.model, args.lora, args.base, args.dtype,
                                                              args.device, args.kernels)
    t0 = time.perf_counter()
    result = {"nll": eval_nll, "accuracy": eval_accuracy, "choice": eval_choice}[args.metric](model, tokenizer, args)
    result = {"metric": args.metric, **result, "model": args.model, "lora": args.lora, "data": args.data,
              "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(result, allow_nan=False))
    elif args.metric == "nll":
        ppl = "inf" if result["ppl"] is None else f"{result['ppl']:.3f}"
        print(f"nll {result['nll']:.4f} per token, perplexity {ppl} "
              f"({result['tokens']} loss tokens in {result['examples']} examples of {args.data})")
    else:
        extra = (f", by length {result['accuracy_norm']:.4f} (characters), {result['accuracy_bytes']:.4f} "
                 f"(bytes)" if args.metric == "choice" else "")
        print(f"{args.metric} {result['accuracy']:.4f}{extra} ({result.get('correct', '')}"
              f"{'/' if 'correct' in result else ''}{result['examples']} examples of {args.data})")
    sys.stdout.flush()


def run() -> None:
    run_cli(main)
