"""Benchmark: read + tokenize a 10k-example conversation file (LMFlow JSON) with the chat-template masks.

    python bench/bench_tokenize.py                  # tiny byte tokenizer, its ChatML template
    python bench/bench_tokenize.py --n 10000 --model path/to/hf-model --template llama3

Prints the time of the first (uncached) tokenization and of the second run, which hits the on-disk cache.
The target (issue 3) is under 10 s for 10k examples on the dev machine.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanolisa.data import read_dataset, tokenize_dataset  # noqa: E402
from nanolisa.tokenizer import load_tokenizer  # noqa: E402


def make_file(path: str, n: int) -> None:
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while models learn to follow short instructions".split()
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    inst = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": say(rng.randint(5, 30))},
                     {"role": "assistant", "content": say(rng.randint(5, 60))}]
        inst.append({"system": "You are helpful.", "messages": msgs})
    with open(path, "w") as f:
        json.dump({"type": "conversation", "instances": inst}, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--model", default="tiny", help="tokenizer directory (default: the built-in tiny one)")
    ap.add_argument("--template", default=None)
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.json")
        make_file(path, args.n)
        for run in ("first (no cache)", "second (cached)"):
            t0 = time.perf_counter()
            ds = read_dataset(path)
            t1 = time.perf_counter()
            td = tokenize_dataset(ds, tok, args.seq_len, template=args.template, cache_dir=os.path.join(d, "cache"))
            t2 = time.perf_counter()
            print(f"{run}: {len(td.examples)} examples, {sum(len(i) for i, _ in td.examples)} tokens, "
                  f"{td.num_tokens_with_loss} with loss, {td.num_truncated} truncated: "
                  f"read {t1 - t0:.2f}s + tokenize {t2 - t1:.2f}s = {t2 - t0:.2f}s")


if __name__ == "__main__":
    main()
