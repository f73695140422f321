#!/usr/bin/env python3
"""Quality in miniature: full fine-tuning, LoRA and LISA from one pretrained checkpoint, each at its own best
learning rate, with the same steps and batches, over several seeds (issue 22). It reports what this tiny
setting shows, not what the paper claims: where LISA loses, the table says so.

1. Pre-train. The built-in tiny preset (random weights) is fully trained on two of the demo tasks,
   first(...) and upper(...) (nanolisa/demo_data.py), by train.py as a user runs it: the base checkpoint.
2. Fine-tune the base on two other tasks, last(...) and reverse(...), with each method below, for the same
   steps, batch size and schedule; for a given seed every method sees the same batches, so the same tokens.
     full                  every weight
     lora-r8, lora-r64     LoRA on every linear layer of the blocks, alpha = 2r (the same scale), no dropout
     lisa-g1, lisa-g2      LISA with 1 or 2 of the 4 blocks active, uniform sampling (the paper's)
     lisa-g1-weighted      --lisa-sampling weighted, --lisa-probs fixed at each block's gradient norm at the
                           base on the first fine-tuning batch (a static importance)
     lisa-g1-gradnorm      --lisa-sampling gradnorm (the importance re-estimated while training)
   LISA re-samples every 20 steps (train.py's default) and trains the embedding and head throughout; LoRA
   trains its adapters only. Every run is one process, so its peak RSS is its own.
3. Learning rate: a small sweep per method on seed 0, chosen by the loss on a validation split of the
   fine-tuning tasks (never the test split); then seeds 1 .. S-1 at that rate. The sweep is reported too.
4. The table: test loss and exact match as the mean over seeds with the standard deviation and the range,
   peak RSS, the fp32 bytes of gradients + AdamW state of what trains at once (theory), seconds per run.

Usage:
  .venv/bin/python bench/quality.py                    # the table (markdown on stdout; rows in --work/runs.jsonl)
  .venv/bin/python bench/quality.py --threads 1        # on a busy machine: see train.py --threads
  .venv/bin/python bench/quality.py --smoke            # every stage with tiny step counts, one seed (seconds)
"""
import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

PRETRAIN_TASKS, FINETUNE_TASKS = ("first", "upper"), ("last", "reverse")
# name -> train.py settings of the method
METHODS = {
    "full": dict(method="full"),
    "lora-r8": dict(method="lora", lora_r=8, lora_alpha=16.0, lora_dropout=0.0),
    "lora-r64": dict(method="lora", lora_r=64, lora_alpha=128.0, lora_dropout=0.0),
    "lisa-g1": dict(method="lisa", lisa_layers=1),
    "lisa-g2": dict(method="lisa", lisa_layers=2),
    "lisa-g1-weighted": dict(method="lisa", lisa_layers=1, lisa_sampling="weighted"),
    "lisa-g1-gradnorm": dict(method="lisa", lisa_layers=1, lisa_sampling="gradnorm"),
}
# The sweep. LoRA (alpha = 2r) did best at the low end of 3e-3 .. 3e-2 in a first run, so its grid reaches lower.
LRS = {"full": (1e-3, 3e-3, 1e-2), "lora": (3e-4, 1e-3, 3e-3, 1e-2), "lisa": (1e-3, 3e-3, 1e-2)}
# The whole benchmark, and its smallest configuration (--smoke, the test suite's smoke test).
FULL = dict(pretrain_examples=20000, pretrain_steps=1500, pretrain_lr=3e-3, train_examples=8000, held_out=200,
            steps=300, batch_size=32, warmup=10, seeds=3, sweep=True)
SMOKE = dict(pretrain_examples=200, pretrain_steps=3, pretrain_lr=3e-3, train_examples=200, held_out=8,
             steps=3, batch_size=4, warmup=0, seeds=1, sweep=False)
MB = 1024 * 1024
LOCK = threading.Lock()  # runs.jsonl is appended to by the threads that wait on --jobs runs


def write_data(work: str, c: dict) -> dict[str, str]:
    """The pre-training set and the fine-tuning train / validation / test splits, as LMFlow text2text files."""
    from nanolisa.demo_data import task_pairs
    from nanolisa.files import atomic_file

    n = c["train_examples"] + 2 * c["held_out"]
    finetune = task_pairs(FINETUNE_TASKS, n, seed=2)  # distinct prompts: the splits never share one
    splits = {"pretrain": task_pairs(PRETRAIN_TASKS, c["pretrain_examples"], seed=1),
              "train": finetune[:c["train_examples"]],
              "val": finetune[c["train_examples"]:c["train_examples"] + c["held_out"]],
              "test": finetune[c["train_examples"] + c["held_out"]:]}
    paths = {}
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    for name, pairs in splits.items():
        paths[name] = os.path.join(work, "data", f"{name}.json")
        with atomic_file(paths[name]) as f:
            json.dump({"type": "text2text", "instances": [{"input": p, "output": a} for p, a in pairs]}, f)
    return paths


def pretrain(work: str, data: dict, c: dict, threads: int | None) -> tuple[str, float]:
    """Full training of the tiny preset on the pre-training tasks with train.py; (checkpoint, seconds)."""
    base = os.path.join(work, "base")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--data", data["pretrain"],
           "--method", "full", "--steps", str(c["pretrain_steps"]), "--lr", str(c["pretrain_lr"]), "--warmup",
           "30", "--batch-size", str(c["batch_size"]), "--eval-every", "0", "--save-every", "0", "--no-plot",
           "--quiet", "--overwrite", "--out", base, *(["--threads", str(threads)] if threads else [])]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return base, time.perf_counter() - t0


def block_grad_norms(base: str, train: str, batch_size: int) -> list[float]:
    """Each block's gradient norm at the base checkpoint on the first fine-tuning batch (seed 0's order)."""
    import torch

    from nanolisa.data import Batches, read_dataset, tokenize_dataset
    from nanolisa.loss import next_token_nll
    from nanolisa.pretrained import load_pretrained

    model, tok = load_pretrained(base)
    data = tokenize_dataset(read_dataset(train, quiet=True), tok, seq_len=256)
    batch = next(iter(Batches(data, batch_size, seed=0, pad_id=tok.pad_token_id or 0)))
    loss = next_token_nll(model, batch["input_ids"], batch["labels"]).sum()  # (B,) summed NLLs -> ()
    loss.backward()
    return [float(torch.stack([p.grad.square().sum() for p in b.parameters()]).sum().sqrt()) for b in model.blocks]


def state_mb(base: str, kw: dict) -> float:
    """fp32 bytes of the gradient and AdamW's m and v of the parameters that train at the same time."""
    from nanolisa.lora import apply_lora, mark_only_lora_trainable
    from nanolisa.pretrained import load_pretrained

    model, _ = load_pretrained(base)
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    if kw["method"] == "full":
        n = count([model])
    elif kw["method"] == "lisa":
        n = count(list(model.embed_modules) + list(model.head_modules)) + kw["lisa_layers"] * count([model.blocks[0]])
    else:
        apply_lora(model, r=kw["lora_r"], alpha=kw["lora_alpha"], targets="all-linear")
        mark_only_lora_trainable(model)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 3 * 4 * n / MB


# ----------------------------------------------------------------------------------------------------------
# One fine-tuning run: a process of its own (`--worker SPEC`), so that its peak RSS is its own


def run_worker(spec: dict) -> dict:
    """Fine-tune the base with one method, learning rate and seed; score the result on the test split."""
    from nanolisa.cli.common import load_for_inference
    from nanolisa.cli.eval import accuracy_pairs
    from nanolisa.data import read_dataset, tokenize_dataset
    from nanolisa.evaluate import exact_match, nll
    from nanolisa.train_config import TrainConfig
    from nanolisa.trainer import train

    c, out = spec["config"], spec["out"]
    cfg = TrainConfig(model=spec["base"], data=spec["data"]["train"], eval_data=spec["data"]["val"], out=out,
                      steps=c["steps"], batch_size=c["batch_size"], lr=spec["lr"], warmup=c["warmup"],
                      seed=spec["seed"], eval_every=c["steps"], save_every=0, plot=False, quiet=True,
                      overwrite=True, threads=spec["threads"], **spec["method"])
    t0, cpu0 = time.perf_counter(), time.process_time()
    final = train(cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    model, tok, _ = load_for_inference(out, dtype="fp32", device="cpu")
    test = read_dataset(spec["data"]["test"], quiet=True)
    total, count = nll(model, tokenize_dataset(test, tok, seq_len=256).examples, batch_size=32)
    prompts, targets = accuracy_pairs(test, tok, None)
    correct, _ = exact_match(model, tok, prompts, targets, max_new_tokens=16, batch_size=32)
    shutil.rmtree(out)
    return {"val_loss": final["eval_loss"], "test_loss": total / count, "test_em": correct / len(prompts),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "wall_s": wall,
            "cpu_s": cpu}


def fine_tune(name: str, lr: float, seed: int, base: str, data: dict, c: dict, work: str,
              probs: list[float], threads: int | None) -> dict:
    method = dict(METHODS[name], **({"lisa_probs": probs} if name.endswith("weighted") else {}))
    spec = {"method": method, "lr": lr, "seed": seed, "base": base, "data": data, "config": c,
            "threads": threads, "out": os.path.join(work, "runs", f"{name}-lr{lr:g}-seed{seed}")}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"error: the {name} run (lr {lr:g}, seed {seed}) failed:\n{p.stderr[-2000:]}")
    row = {"method": name, "lr": lr, "seed": seed, **json.loads(p.stdout.strip().splitlines()[-1])}
    with LOCK, open(os.path.join(work, "runs.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name:17s} lr {lr:<6g} seed {seed}: val loss {row['val_loss']:.4f}, test loss {row['test_loss']:.4f}, "
          f"exact match {100 * row['test_em']:.1f}% ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    return row


# ----------------------------------------------------------------------------------------------------------
# The report


def spread(values: list[float], fmt: str) -> str:
    """mean ± standard deviation (min-max) over the seeds."""
    if len(values) == 1:
        return fmt.format(values[0])
    return (f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))} "
            f"({fmt.format(min(values))}-{fmt.format(max(values))})")


def report(results: dict, sweeps: dict, states: dict, probs: list[float], c: dict, pretrain_s: float) -> str:
    seeds = len(next(iter(results.values())))
    lines = [f"Fine-tuning {c['steps']} steps x batch {c['batch_size']} ({c['steps'] * c['batch_size']} examples "
             f"of {'/'.join(FINETUNE_TASKS)}), {seeds} seed(s) at each method's best learning rate; the base: "
             f"{c['pretrain_steps']} full steps on {'/'.join(PRETRAIN_TASKS)} ({pretrain_s:.0f} s). "
             f"lisa-g1-weighted's --lisa-probs (normalised): {', '.join(f'{p / sum(probs):.3f}' for p in probs)}.", "",
             "| method | lr | test loss | test exact match % | peak RSS MB | grad + AdamW MB (theory) "
             "| wall s / run | CPU s / run |", "|---|---:|---|---|---:|---:|---:|---:|"]
    for name, rows in results.items():
        lines.append(f"| {name} | {rows[0]['lr']:g} | {spread([r['test_loss'] for r in rows], '{:.3f}')} "
                     f"| {spread([100 * r['test_em'] for r in rows], '{:.1f}')} "
                     f"| {max(r['peak_rss_mb'] for r in rows):.0f} | {states[name]:.2f} "
                     f"| {statistics.mean(r['wall_s'] for r in rows):.1f} "
                     f"| {statistics.mean(r['cpu_s'] for r in rows):.1f} |")
    if any(len(s) > 1 for s in sweeps.values()):
        width = max(len(rows) for rows in sweeps.values())
        lines += ["", "Learning-rate sweep (seed 0): validation loss, the lowest chosen (test exact match beside it):",
                  "", "| method | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " |",
                  "|---|" + "---|" * width]
        for name, rows in sweeps.items():
            cells = [f"{r['lr']:g}: {r['val_loss']:.3f} ({100 * r['test_em']:.0f}%)" for r in rows]
            lines.append(f"| {name} | " + " | ".join(cells + [""] * (width - len(rows))) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "nanolisa-quality"), help="working "
                    "directory: the data, the base checkpoint, runs.jsonl; new, or an earlier run's, which is "
                    "replaced (default: %(default)s)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of every run (default: torch's)")
    ap.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at a time (default: %(default)s; "
                    "with 2 cores, --jobs 2 --threads 1 is about as fast, and each run's time is then its own)")
    ap.add_argument("--smoke", action="store_true", help="the smallest configuration: tiny step counts, one "
                    "seed, each method's middle learning rate only")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(run_worker(json.loads(a.worker))))
        return
    names = a.methods.split(",")
    if any(n not in METHODS for n in names):
        ap.error(f"--methods: choose among {', '.join(METHODS)}")
    c = SMOKE if a.smoke else FULL
    if os.path.isdir(a.work) and os.listdir(a.work):
        if not os.path.isfile(os.path.join(a.work, "data", "pretrain.json")):
            ap.error(f"--work {a.work} holds other files: choose a new directory")
        shutil.rmtree(a.work)
    t0 = time.perf_counter()
    data = write_data(a.work, c)
    base, pretrain_s = pretrain(a.work, data, c, a.threads)
    probs = block_grad_norms(base, data["train"], c["batch_size"])
    run = lambda name, lr, seed: fine_tune(name, lr, seed, base, data, c, a.work, probs, a.threads)  # noqa: E731
    grid = {n: LRS[METHODS[n]["method"]] if c["sweep"] else LRS[METHODS[n]["method"]][1:2] for n in names}
    with ThreadPoolExecutor(a.jobs) as pool:  # each run is a process of its own; threads only wait for them
        swept = {(n, lr): pool.submit(run, n, lr, 0) for n in names for lr in grid[n]}
        sweeps = {n: [swept[n, lr].result() for lr in grid[n]] for n in names}
        best = {n: min(sweeps[n], key=lambda r: r["val_loss"]) for n in names}
        seeded = {(n, s): pool.submit(run, n, best[n]["lr"], s) for n in names for s in range(1, c["seeds"])}
        results = {n: [best[n]] + [seeded[n, s].result() for s in range(1, c["seeds"])] for n in names}
    states = {n: state_mb(base, METHODS[n]) for n in names}
    print(report(results, sweeps, states, probs, c, pretrain_s))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{a.threads or 'default'}, {a.jobs} run(s) at a time, load average at the end {os.getloadavg()[0]:.1f}; "
          f"{(time.perf_counter() - t0) / 60:.1f} min in all")


if __name__ == "__main__":
    main()
