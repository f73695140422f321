"""Bundled demo data: small instruction tasks generated on the fly, no download.

Every answer is short and fully determined by its prompt, so the tiny built-in model (a Llama over a byte
tokenizer, starting from random weights) learns them in minutes on a CPU, and held-out accuracy means
something. The demo's tasks run from easy to hard, so accuracy climbs task by task:

    first(abc)=    -> a
    last(abc)=     -> c
    upper(abc)=    -> ABC
    reverse(abc)=  -> cba

`task_example` knows one more, 2-digit addition (`12+7=` -> 19), which bench/quality.py can use but the demo
leaves out: the tiny model does not learn it in the demo's 3000 steps (2-8% of held-out sums right in
every run tried), so it only made the demo's score hang on how well `reverse` happened to go (68.5% to 82%
held-out exact match, by seed and by machine). The words are 3-6 letters, so there are plenty of them:
20000 training examples make the tasks generalise (with 3000 the model memorised, and `reverse` failed
on most held-out words).

`demo_instances(split, fmt)` returns LMFlow instances: fmt="conversation" (one user turn, one assistant
turn) or fmt="text2text" ({"input", "output"}). The train split (20000 examples) and the test split (200)
never share a prompt. `write_demo(out_dir)` writes them as LMFlow JSON files for users to look at:
conversation_train.json, conversation_test.json, text2text_train.json, text2text_test.json.
"""
from __future__ import annotations

import json
import os
import random
import string

from nanolisa.files import atomic_file

DEMO_VERSION = 3  # bump when the generator changes (it is part of the tokenization-cache key)
NUM_TRAIN, NUM_TEST = 20000, 200
SEED = 1234
# From easy to hard for a model that starts from random weights: first/last need one attention hop, upper
# and reverse need copying (an induction head).
TASKS = ("first", "last", "upper", "reverse")


def task_example(kind: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) of a task: the word tasks on 3-6 lowercase letters; add (addition needs carrying)
    on two numbers < 100."""
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}=", str(a + b)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    answer = {"first": word[0], "last": word[-1], "upper": word.upper(), "reverse": word[::-1]}[kind]
    return f"{kind}({word})=", answer


def task_pairs(kinds: tuple[str, ...], n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs with distinct prompts, each task drawn with equal chance."""
    rng = random.Random(seed)
    pairs: dict[str, str] = {}
    while len(pairs) < n:
        pairs.setdefault(*task_example(rng.choice(kinds), rng))
    return list(pairs.items())


def demo_pairs(split: str = "train") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a split; the same on every machine and every run."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    items = task_pairs(TASKS, NUM_TRAIN + NUM_TEST, SEED)  # distinct prompts: train and test cannot overlap
    return items[NUM_TRAIN:] if split == "test" else items[:NUM_TRAIN]


def demo_instances(split: str = "train", fmt: str = "conversation") -> list[dict]:
    pairs = demo_pairs(split)
    if fmt == "text2text":
        return [{"input": p, "output": a} for p, a in pairs]
    if fmt == "conversation":
        return [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]} for p, a in pairs]
    raise ValueError(f"fmt must be 'conversation' or 'text2text', got {fmt!r}")


def write_demo(out_dir: str) -> list[str]:
    """Write the demo splits as LMFlow JSON files; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for fmt in ("conversation", "text2text"):
        for split in ("train", "test"):
            path = os.path.join(out_dir, f"{fmt}_{split}.json")
            with atomic_file(path) as f:
                json.dump({"type": fmt, "instances": demo_instances(split, fmt)}, f, indent=1, ensure_ascii=False)
            written.append(path)
    return written
