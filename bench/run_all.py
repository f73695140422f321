#!/usr/bin/env python3
"""Run nanolisa's and the peers' training benchmarks back to back and print one markdown report.

For each shape, one mode per process (peak RSS is per process), nanolisa's and the peers' runs alternating
(full, peers' full, LoRA, peft's LoRA, LISA, LMFlow's LISA, ...), so a change of machine load over the
session falls on both stacks alike:
  nanolisa  bench/bench_train.py   full, lora, lisa gamma=1  (+ lisa gamma=2, full and lisa with --ckpt)
  peers     peer_stack.py          full (torch AdamW), lora (peft), lmflow (LMFlow's LISA callback as shipped)
then the side-by-side table (tokens/s and peak memory by method, nanolisa / peers), the raw figures, and
the ratios behind issue 21's targets:
  every method >= 1.2x the peers' tokens/s and <= their peak memory; LoRA <= 0.85x peft's memory;
  LISA gamma=1 peak RSS <= 0.5x full fine-tuning; flat across switches (within 5%);
  LISA gamma=1 tokens/s within 10% of its bound, 3 (L B + H) / (2 L B + gamma B + 3 H) x full's (`lisa_bound`;
  3 / (2 + gamma/L) when the head H is small beside the L blocks B): with a trained embedding backward
  runs through every block, and a frozen block skips only its weight gradients, 1 of the 3 matmuls per
  weight of a trained block's forward + backward; the head, trained by both, skips nothing.
--png draws the side-by-side figures (matplotlib, the `plot` extra); README shows bench/side_by_side.png.

peer_stack.py is run unchanged through runpy. The one addition: its two time.perf_counter() calls (start of
step 1, end of the run) also read time.process_time(), so its rows get tokens per CPU-second as well --
on a shared 2-core machine wall-clock speed depends on what else runs, CPU time much less so.

Usage:
  .venv/bin/python bench/run_all.py                  # shapes a and b (~45 minutes on 2 busy cores, ~20 idle)
  .venv/bin/python bench/run_all.py --shape b        # only peer_stack.py's documented example
  .venv/bin/python bench/run_all.py --shape tiny     # a seconds-long smoke run of the whole pipeline
  .venv/bin/python bench/run_all.py --shape a --no-extra --compile   # nanolisa's rows with torch.compile
  .venv/bin/python bench/run_all.py --shape a --no-extra --malloc-mmap-threshold 1048576 \
      --out bench/side_by_side.md --png bench/side_by_side.png   # the README's table and figure (idle machine)
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(ROOT, "..", "shared", "bench", "peer_stack.py")  # ../shared beside the checkout

SHAPES = {
    # issue 4's target: ~100M-parameter Llama-shaped model, 12 blocks of width 768, small vocab, 4 x 512, fp32.
    # --steps 11 with --interval 1: 11 switches (the first at step 0), 10 timed steps.
    "a": "--layers 12 --hidden 768 --ffn 2048 --heads 12 --kv-heads 12 --vocab 320 --batch 4 --seq 512 "
         "--steps 11 --interval 1",
    # peer_stack.py's documented example.
    "b": "--layers 8 --hidden 1024 --ffn 2816 --heads 8 --kv-heads 4 --vocab 300 --batch 2 --seq 128 "
         "--steps 11 --interval 1",
    # issue 21's Llama-2-like shape: vocab 32000, 8 x 1024, ffn 2816, ~166M parameters, one row of 512.
    "c": "--layers 8 --hidden 1024 --ffn 2816 --heads 8 --kv-heads 8 --vocab 32000 --batch 1 --seq 512 "
         "--steps 11 --interval 1",
    "tiny": "--layers 4 --hidden 128 --ffn 256 --heads 4 --kv-heads 2 --vocab 300 --batch 2 --seq 64 "
            "--steps 3 --interval 1",
}
METHODS = [("full", "nanolisa:full", "peers:full"), ("LoRA r=8 all-linear", "nanolisa:lora", "peers:lora"),
           ("LISA g=1", "nanolisa:lisa-g1", "peers:lmflow")]  # (label, nanolisa's row, the peers' row)


# Steps for the rows that do not switch layers (full, LoRA, and the checkpointing rows), where the run is slow:
# their peak RSS is reached within the first 3-4 steps (weights, grads and Adam state are all allocated by the
# end of step 0, allocator growth settles by step 3), so a shorter run measures the same peak. LISA and LMFlow
# keep the shape's --steps: their flatness over 10+ switches is what is measured.
SHORT_STEPS = {"a": 5, "c": 5}


def peer_main(argv: list[str]) -> None:
    """Run peer_stack.py as-is, adding tokens per CPU-second to its JSON line."""
    import contextlib
    import io
    import runpy

    script, args = argv[0], argv[1:]
    cpu_marks = []
    wall = time.perf_counter

    def perf_counter() -> float:
        cpu_marks.append(time.process_time())
        return wall()

    time.perf_counter = perf_counter
    sys.argv = [script] + args
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        runpy.run_path(script, run_name="__main__")
    row = json.loads(buf.getvalue().strip().splitlines()[-1])
    a = dict(zip(args[::2], args[1::2]))
    tokens = int(a.get("--batch", 2)) * int(a.get("--seq", 128)) * (int(a.get("--steps", 11)) - 1)
    row["tokens_per_cpu_s"] = round(tokens / (cpu_marks[-1] - cpu_marks[0]), 1)
    print(json.dumps(row), flush=True)


def peer_base_rss(with_peft: bool) -> int:
    """RSS (MB) of a process that has imported what peer_stack.py imports, before it builds a model."""
    code = ("import torch, transformers as tf; tf.LlamaForCausalLM; " + ("import peft; " if with_peft else "") +
            "print(int(open('/proc/self/statm').read().split()[1]) * 4096 // 2**20)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run(cmd: list[str], log, env: dict | None = None) -> dict:
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"failed: {' '.join(cmd)}")
    row = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
    row["elapsed_s"] = round(time.time() - t)
    row["steps"] = int(cmd[len(cmd) - 1 - cmd[::-1].index("--steps") + 1])
    print(f"  {row['elapsed_s']:4d}s  {json.dumps(row)}", file=log, flush=True)
    return row


def fmt_ratio(x: float, target: str, ok: bool) -> str:
    return f"{x:.2f}x ({'met' if ok else 'NOT met'}: {target})"


def lisa_bound(shape: str, gamma: int = 1) -> float:
    """LISA's tokens/s over full fine-tuning's at most, counting matmul work per token in weights touched.

    Full fine-tuning: every weight 3 times (forward, input gradient, weight gradient). LISA with a trained
    embedding: every block forward and input gradient (2 L B), the gamma active blocks' weight gradients
    (gamma B), and the head all 3 times (3 H), since LISA trains it too. B: one block's matmul weights; H:
    the head's (vocab x C); the embedding is a lookup. Without the head (a small vocabulary) this is the
    issue's 3 / (2 + gamma/L); at vocabulary 32000 the head is 2.6 blocks of work that LISA cannot skip."""
    flag = lambda name: int(SHAPES[shape].split(f"--{name} ")[1].split()[0])  # noqa: E731
    c, heads, kv, ffn, vocab, layers = (flag(n) for n in ("hidden", "heads", "kv-heads", "ffn", "vocab", "layers"))
    block = c * c * (2 + 2 * kv / heads) + 3 * c * ffn  # q, o; k, v; gate, up, down
    head = vocab * c
    return 3 * (layers * block + head) / (2 * layers * block + gamma * block + 3 * head)


def side_by_side(shape: str, rows: dict[str, dict]) -> list[str]:
    """The headline: tokens/s and peak memory by method, nanolisa against the peers, with the targets."""
    out = ["| method | nanolisa tokens/s | peers tokens/s | ratio (>= 1.2x) | nanolisa peak MB | peers peak MB "
           "| ratio (<= 1x; LoRA <= 0.85x) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, ours, theirs in METHODS:
        if ours not in rows or theirs not in rows:
            continue
        o, t = rows[ours], rows[theirs]
        mem_target = 0.85 if ours == "nanolisa:lora" else 1.0
        speed, mem = o["tokens_per_s"] / t["tokens_per_s"], o["peak_rss_mb"] / t["peak_rss_mb"]
        out.append(f"| {label} | {o['tokens_per_s']} | {t['tokens_per_s']} "
                   f"| {speed:.2f}x {'met' if speed >= 1.2 else 'NOT met'} | {o['peak_rss_mb']} | {t['peak_rss_mb']} "
                   f"| {mem:.2f}x {'met' if mem <= mem_target else 'NOT met'} |")
    if "nanolisa:lisa-g1" in rows and "nanolisa:full" in rows:
        L, full = rows["nanolisa:lisa-g1"], rows["nanolisa:full"]
        bound = lisa_bound(shape)
        got = L["tokens_per_s"] / full["tokens_per_s"]
        out += ["", f"- LISA g=1 tokens/s bound: 3 (L B + H) / (2 L B + B + 3 H) = {bound:.3f}x full's ({bound * full['tokens_per_s']:.1f}"
                f" tokens/s); measured {got:.3f}x = **{got / bound:.2f} of the bound** "
                f"({'met' if got >= 0.9 * bound else 'NOT met'}: >= 0.9)",
                f"- LISA g=1 peak vs nanolisa full: {L['peak_rss_mb'] / full['peak_rss_mb']:.2f}x "
                f"({'met' if L['peak_rss_mb'] <= 0.5 * full['peak_rss_mb'] else 'NOT met'}: <= 0.5x)"]
    return out + [""]


def draw(per_shape: dict[str, dict[str, dict]], path: str) -> bool:
    """One PNG: peak memory and tokens/s by method, nanolisa beside the peers, a row of panels per shape."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no figure was drawn (pip install matplotlib)", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(per_shape), 2, figsize=(10, 3.2 * len(per_shape)), squeeze=False)
    for row, (shape, rows) in zip(axes, per_shape.items()):
        methods = [m for m in METHODS if m[1] in rows and m[2] in rows]
        x = range(len(methods))
        for ax, key, title in zip(row, ("peak_rss_mb", "tokens_per_s"), ("peak memory (MB)", "tokens/s")):
            for k, (stack, colour) in enumerate((("nanolisa", "tab:blue"), ("peers", "tab:gray"))):
                vals = [rows[m[1 + k]][key] for m in methods]
                ax.bar([i + (k - 0.5) * 0.38 for i in x], vals, 0.38, label=stack, color=colour)
            ax.set_xticks(list(x), [m[0] for m in methods])
            ax.set_title(f"shape {shape}: {title}")
        row[0].legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def report(shape: str, rows: dict[str, dict], peer_base: tuple[int, int], commands: list[str]) -> str:
    out = [f"### Shape {shape}: `{SHAPES[shape]}`", ""] + side_by_side(shape, rows)
    out.append("| stack | mode | peak RSS MB | peak - import RSS MB | weights+grads+Adam (theory) MB "
               "| saved activations MB | tokens/s (wall) | tokens/CPU-s | Adam state tensors | steps |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in rows.items():
        stack, mode = key.split(":")
        base = r.get("base_rss_mb", peer_base[mode == "lora"])
        out.append(f"| {stack} | {mode} | {r['peak_rss_mb']} | {r['peak_rss_mb'] - base} "
                   f"| {r.get('theory_state_mb', '')} | {r.get('saved_activations_mb', '')} "
                   f"| {r['tokens_per_s']} | {r.get('tokens_per_cpu_s', '')} | {r['optimizer_state_tensors']} "
                   f"| {r['steps']} |")
    out.append("")
    if not all(k in rows for k in ("nanolisa:lisa-g1", "nanolisa:full", "nanolisa:lora", "peers:full", "peers:lmflow")):
        return "\n".join(out)
    L = rows["nanolisa:lisa-g1"]
    full, lora = rows["nanolisa:full"], rows["nanolisa:lora"]
    pfull, plmf = rows["peers:full"], rows["peers:lmflow"]
    pk = L["peak_rss_mb"]
    out += [
        f"- nanolisa LISA g=1 peak vs nanolisa full: "
        f"{fmt_ratio(pk / full['peak_rss_mb'], '<= 0.5x', pk <= 0.5 * full['peak_rss_mb'])}",
        f"- nanolisa LISA g=1 peak vs nanolisa LoRA: "
        f"{fmt_ratio(pk / lora['peak_rss_mb'], '<= 1.1x', pk <= 1.1 * lora['peak_rss_mb'])}",
        f"- nanolisa LISA g=1 peak vs peers' full: {pk / pfull['peak_rss_mb']:.2f}x; "
        f"vs LMFlow LISA: {pk / plmf['peak_rss_mb']:.2f}x",
        f"- LISA g=1 flat across {L['switches']} switches: peak after the 1st {L['peak_rss_after_first_switch_mb']}"
        f" MB, after the last {L['peak_rss_after_last_switch_mb']} MB: "
        f"{fmt_ratio(L['flat_ratio'], '<= 1.05x', L['flat_ratio'] <= 1.05)}",
        f"- LISA g=1 tokens/s vs nanolisa full: wall {L['tokens_per_s'] / full['tokens_per_s']:.2f}x"
        f"; per CPU-second {L['tokens_per_cpu_s'] / full['tokens_per_cpu_s']:.2f}x",
        f"- LISA g=1 tokens/s vs peers' full: wall {L['tokens_per_s'] / pfull['tokens_per_s']:.2f}x, "
        f"per CPU-second {L['tokens_per_cpu_s'] / pfull['tokens_per_cpu_s']:.2f}x; vs LMFlow LISA: wall "
        f"{L['tokens_per_s'] / plmf['tokens_per_s']:.2f}x, per CPU-second "
        f"{L['tokens_per_cpu_s'] / plmf['tokens_per_cpu_s']:.2f}x",
    ]
    if "nanolisa:lisa-g1+ckpt" in rows and "nanolisa:full+ckpt" in rows:
        c, f = rows["nanolisa:lisa-g1+ckpt"]["peak_rss_mb"], rows["nanolisa:full+ckpt"]["peak_rss_mb"]
        out.append(f"- with activation checkpointing: LISA g=1 peak {c} MB vs full {f} MB: "
                   f"{fmt_ratio(c / f, '<= 0.5x', c <= 0.5 * f)}; vs LoRA (no checkpointing): "
                   f"{c / lora['peak_rss_mb']:.2f}x")
    out += ["", "Per-step detail (LISA g=1): active block, peak RSS within the step (MB), RSS after the step (MB):",
            "", "| step | " + " | ".join(str(i) for i in range(len(L["step_peak_mb"]))) + " |",
            "|---|" + "---:|" * len(L["step_peak_mb"]),
            "| active block | " + " | ".join(str(x) for x in L["active_by_step"]) + " |",
            "| peak in step | " + " | ".join(str(x) for x in L["step_peak_mb"]) + " |",
            "| RSS after | " + " | ".join(str(x) for x in L["rss_by_step_mb"]) + " |", "",
            "<details><summary>commands and raw JSON</summary>", "", "```"]
    out += commands + [""] + [json.dumps({"run": k, **r}) for k, r in rows.items()] + ["```", "</details>", ""]
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        return peer_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["a", "b", "c", "both", "tiny"], default="both", help="both: a and b")
    ap.add_argument("--no-ckpt", action="store_true", help="skip the activation-checkpointing rows")
    ap.add_argument("--no-extra", action="store_true", help="only the side-by-side rows: full, LoRA and LISA "
                    "g=1 of each stack (no g=2, no checkpointing rows)")
    ap.add_argument("--png", help="draw the side-by-side figure here (needs matplotlib)")
    ap.add_argument("--peer-script", default=PEER)
    ap.add_argument("--out", help="also write the markdown report here")
    ap.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                    help="run every process with MALLOC_MMAP_THRESHOLD_=BYTES: glibc then serves each allocation "
                         "above BYTES with its own mmap and returns it to the OS when freed, so RSS follows the "
                         "live tensors instead of glibc's heap high-water mark")
    ap.add_argument("--compile", action="store_true", help="nanolisa's rows with --compile (torch.compile per "
                    "block; tokens/s counts the steps after the first, LISA's recompilations at switches included)")
    ap.add_argument("--only", help="comma-separated run names to keep, e.g. nanolisa:full,nanolisa:lisa-g1")
    a = ap.parse_args()

    py = sys.executable
    shapes = ["a", "b"] if a.shape == "both" else [a.shape]
    peer_base = peer_base_rss(False), peer_base_rss(True)
    parts = [f"Run {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()} {os.cpu_count()} CPUs, "
             f"torch {__import__('torch').__version__}, Python {platform.python_version()}; "
             f"peers' import RSS {peer_base[0]} MB (torch + transformers), {peer_base[1]} MB (+ peft).", ""]
    per_shape: dict[str, dict[str, dict]] = {}
    for shape in shapes:
        args = SHAPES[shape].split()
        ours = [("nanolisa:full", ["--mode", "full"]), ("nanolisa:lora", ["--mode", "lora"]),
                ("nanolisa:lisa-g1", ["--mode", "lisa", "--lisa-layers", "1"])]
        peers = [("peers:full", ["--mode", "full"]), ("peers:lora", ["--mode", "lora"]),
                 ("peers:lmflow", ["--mode", "lmflow", "--lisa-layers", "1"])]
        extra = [] if a.no_extra else [("nanolisa:lisa-g2", ["--mode", "lisa", "--lisa-layers", "2"])]
        if not a.no_ckpt and not a.no_extra:
            extra += [("nanolisa:full+ckpt", ["--mode", "full", "--grad-checkpointing"]),
                      ("nanolisa:lisa-g1+ckpt", ["--mode", "lisa", "--lisa-layers", "1", "--grad-checkpointing"])]

        def steps(key: str) -> list[str]:
            switches = key.endswith(("lisa-g1", "lisa-g2", "lmflow"))
            return [] if switches or shape not in SHORT_STEPS else ["--steps", str(SHORT_STEPS[shape])]

        def ours_cmd(k, m):
            return k, [py, "bench/bench_train.py"] + m + args + steps(k) + (["--compile"] if a.compile else [])

        jobs = []
        for (k, m), (pk, pm) in zip(ours, peers):  # alternating: nanolisa, then the peers, per method
            jobs += [ours_cmd(k, m), (pk, [py, "bench/run_all.py", "--peer", a.peer_script] + pm + args + steps(pk))]
        jobs += [ours_cmd(k, m) for k, m in extra]
        print(f"shape {shape}:", file=sys.stderr, flush=True)
        if a.only:
            jobs = [(k, cmd) for k, cmd in jobs if k in a.only.split(",")]
        env = dict(os.environ)
        if a.malloc_mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(a.malloc_mmap_threshold)
        rows = {k: run(cmd, sys.stderr, env) for k, cmd in jobs}
        per_shape[shape] = rows
        commands = [" ".join(os.path.relpath(c, ROOT) if c == py else c for c in cmd) for _, cmd in jobs]
        if a.malloc_mmap_threshold:
            commands = [f"MALLOC_MMAP_THRESHOLD_={a.malloc_mmap_threshold} {c}" for c in commands]
        parts.append(report(shape, rows, peer_base, commands) if not a.only else
                     "\n".join(side_by_side(shape, rows) + ["```"] + commands
                               + [json.dumps({"run": k, **r}) for k, r in rows.items()] + ["```"]))
    text = "\n".join(parts)
    print(text)
    if a.png:
        draw(per_shape, a.png)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
