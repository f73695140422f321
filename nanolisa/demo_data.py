"""Bundled demo data: small instruction tasks generated on the fly, no download.

Every answer is short and fully determined by its prompt, so the tiny built-in model (a Llama over a byte
tokenizer, starting from random weights) learns some of them in minutes on a CPU, and held-out accuracy
means something. The tasks run from easy to hard, so accuracy climbs task by task:

    first(abc)=    -> a
    last(abc)=     -> c
    upper(abc)=    -> ABC
    reverse(abc)=  -> cba
    12+7=          -> 19          (2-digit addition)

`demo_instances(split, fmt)` returns LMFlow instances: fmt="conversation" (one user turn, one assistant
turn) or fmt="text2text" ({"input", "output"}). The train split (3000 examples) and the test split (200)
never share a prompt. `write_demo(out_dir)` writes them as LMFlow JSON files for users to look at:
conversation_train.json, conversation_test.json, text2text_train.json, text2text_test.json.
"""
from __future__ import annotations

import json
import os
import random
import string

from nanolisa.files import atomic_file

DEMO_VERSION = 2  # bump when the generator changes (it is part of the tokenization-cache key)
NUM_TRAIN, NUM_TEST = 3000, 200
SEED = 1234


def _prompt(rng: random.Random) -> tuple[str, str]:
    # From easy to hard for a model that starts from random weights: first/last need one attention hop,
    # upper and reverse need copying (an induction head), addition needs carrying.
    kind = rng.choice(["first", "last", "upper", "reverse", "add"])
    if kind == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}=", str(a + b)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    if kind == "first":
        return f"first({word})=", word[0]
    if kind == "last":
        return f"last({word})=", word[-1]
    if kind == "reverse":
        return f"reverse({word})=", word[::-1]
    return f"upper({word})=", word.upper()


def demo_pairs(split: str = "train") -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a split; the same on every machine and every run."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(SEED)
    pairs: dict[str, str] = {}
    while len(pairs) < NUM_TRAIN + NUM_TEST:  # unique prompts, so train and test cannot overlap
        p, a = _prompt(rng)
        pairs.setdefault(p, a)
    items = list(pairs.items())
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
