#!/usr/bin/env python3
"""The first run on a GPU: what no GPU has checked yet, in one script of a few minutes, printing one table.

  1. kernels      the Triton kernels' self-check (nanolisa.kernels.check) in bf16 and fp16, head sizes 64/128
  2. attention    Triton flash attention forward + backward against SDPA's flash backend, causal, bf16, at
                  1k-8k tokens and head sizes 64 and 128: the largest error of the output and of dq, dk, dv,
                  and the time of each
  3. fused loss   the peak memory of the LM head + cross-entropy at vocab 128256 (4096 tokens, width 4096,
                  bf16 autocast), fused (kernels/linear_cross_entropy.py) against the full logits, and the loss
  4. 7B LISA      a Llama-2-7B-shaped model (random weights built on the GPU, fp32 master weights) trained by
                  LISA gamma=2 in bf16 autocast, 2048 tokens per step: peak memory and time of a step
  5. vs peers     nanolisa against the peers' stack (transformers + torch AdamW, peft LoRA, LMFlow's LISA
                  callback) at issue 21's shape c (8 x 1024, ffn 2816, vocab 32000, 1 x 512 tokens), bf16
                  autocast for both: tokens/s and peak memory of full, LoRA r=8 all-linear and LISA gamma=1

Memory on the GPU is torch.cuda.max_memory_allocated over each case (one process, cases one after another,
the cache emptied between them); times are CUDA-event medians after warm-up.

Usage:
  python bench/gpu_check.py                   # on a CUDA GPU: ~5 minutes on an H100/H200 (80 GB or more)
  python bench/gpu_check.py --json rows.jsonl # also every row as JSON
  TRITON_INTERPRET=1 python bench/gpu_check.py --cpu-smoke   # tiny shapes on the CPU, no timings, no memory
                                                             # (what tests/test_gpu_check.py runs)
Exit status 1 if a correctness check failed (a kernel's error above its tolerance, a loss that differs).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanolisa.activation_memory import lean  # noqa: E402
from nanolisa.adamw import AdamW  # noqa: E402
from nanolisa.config import ModelConfig  # noqa: E402
from nanolisa.kernels import interpreting, triton_installed, use_kernels  # noqa: E402
from nanolisa.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from nanolisa.lisa import LISA  # noqa: E402
from nanolisa.loss import next_token_nll  # noqa: E402
from nanolisa.model import AttentionMask, build_model, sdpa_attention  # noqa: E402
from nanolisa.trainer import param_groups  # noqa: E402

GB = 2**30
SKIPPED = "skipped: needs triton and a GPU (or TRITON_INTERPRET=1)"
# (layers, hidden, ffn, heads, kv heads, vocab, batch, seq)
SHAPES = {"7b": (32, 4096, 11008, 32, 32, 32000, 1, 2048), "c": (8, 1024, 2816, 8, 8, 32000, 1, 512),
          "tiny": (2, 64, 128, 4, 4, 256, 1, 32)}


class Probe:
    """Peak device memory and elapsed time of what runs inside `with probe.case():` (GPU), or nothing (CPU)."""

    def __init__(self, device: torch.device):
        self.gpu = device.type == "cuda"

    def reset(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self, base: int = 0) -> float | None:
        return round((torch.cuda.max_memory_allocated() - base) / GB, 3) if self.gpu else None

    def time_ms(self, fn, repeat: int = 5, warmup: int = 2) -> float | None:
        """Median milliseconds of fn() (after warm-up), None on the CPU (the smoke run times nothing)."""
        if not self.gpu:
            fn()
            return None
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return round(statistics.median(times), 3)


def row(section: str, case: str, ok: bool | None = None, **figures) -> dict:
    return {"section": section, "case": case, "ok": ok, **figures}


def kernel_rows(device: torch.device, smoke: bool) -> list[dict]:
    """1. nanolisa.kernels.check: each Triton kernel against PyTorch's."""
    from nanolisa.kernels.check import check
    if not triton_installed() or (device.type != "cuda" and not interpreting()):
        return [row("kernels", "Triton self-check", None, note=SKIPPED)]
    out = []
    for dname, dtype in ([("fp32", torch.float32)] if smoke else [("bf16", torch.bfloat16), ("fp16", torch.float16)]):
        for kernel, hs in [("attention", 64), ("attention", 128), ("rmsnorm", None), ("loss", None)]:
            if smoke and hs == 128:
                continue
            ok, detail = check(kernel, device, dtype, hs or 128)
            out.append(row("kernels", f"{kernel}{f' hs={hs}' if hs else ''} {dname}", ok, note=detail))
    return out


def attention_rows(device: torch.device, probe: Probe, smoke: bool) -> list[dict]:
    """2. Triton flash attention vs SDPA's flash backend, forward + backward, causal, bf16."""
    if not triton_installed() or (device.type != "cuda" and not interpreting()):
        return [row("attention", "flash vs SDPA", None, note=SKIPPED)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from nanolisa.kernels.check import TOLERANCE
    from nanolisa.kernels.flash_attention import flash_attention
    dtype = torch.float32 if smoke else torch.bfloat16
    out = []
    for T in ((48,) if smoke else (1024, 2048, 4096, 8192)):
        for hs in ((64,) if smoke else (64, 128)):
            nh = 2 if smoke else 32
            g = torch.Generator(device="cpu").manual_seed(T + hs)
            q, k, v, dy = (torch.randn(1, nh, T, hs, generator=g).to(device, dtype) for _ in range(4))
            mask = AttentionMask(torch.arange(T, device=device).expand(1, T), 0, False)

            def ours():
                return _fwd_bwd(lambda a, b, c: flash_attention(a, b, c, mask), q, k, v, dy)

            def sdpa():
                if smoke:  # the CPU: model.py's own attention
                    return _fwd_bwd(lambda a, b, c: sdpa_attention(a, b, c, mask), q, k, v, dy)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return _fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                    q, k, v, dy)

            got, want = ours(), sdpa()
            err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, want))
            t_ours, t_sdpa = probe.time_ms(ours), probe.time_ms(sdpa)
            out.append(row("attention", f"T={T} hs={hs} fwd+bwd", err <= TOLERANCE[dtype], error=f"{err:.1e}",
                           nanolisa_ms=t_ours, reference_ms=t_sdpa,
                           ratio=round(t_sdpa / t_ours, 2) if t_ours else None))
    return out


def _fwd_bwd(fn, q, k, v, dy) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def fused_loss_rows(device: torch.device, probe: Probe, smoke: bool) -> list[dict]:
    """3. The fused linear + cross-entropy's peak against the full logits', at vocab 128256, bf16 autocast."""
    V, C, N = (1000, 64, 100) if smoke else (128256, 4096, 4096)
    g = torch.Generator(device="cpu").manual_seed(0)
    h0 = (torch.randn(N, C, generator=g) * 0.5).to(device)
    w = (torch.randn(V, C, generator=g) * 0.02).to(device).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)
    results = {}
    for name, loss_fn in (("full logits", lambda h: F.cross_entropy(F.linear(h, w).float(), t, reduction="none")),
                          ("fused", lambda h: linear_cross_entropy(h, w, None, t))):
        w.grad = None
        h = h0.clone().requires_grad_()
        probe.reset()
        base = torch.cuda.memory_allocated() if probe.gpu else 0
        with amp:
            loss = loss_fn(h).mean()
        loss.backward()
        results[name] = (float(loss.detach()), probe.peak_gb(base))
        del loss, h
    (lf, pf), (lu, pu) = results["full logits"], results["fused"]
    ok = abs(lf - lu) <= 1e-2 * abs(lf)
    return [row("fused loss", f"V={V} N={N} C={C} bf16", ok, loss_full=round(lf, 4), loss_fused=round(lu, 4),
                nanolisa_peak_gb=pu, reference_peak_gb=pf, ratio=round(pu / pf, 3) if pf else None)]


def llama(shape: str, device: torch.device) -> torch.nn.Module:
    """A random Llama of SHAPES[shape], built where it will run (no host copy of a 7B model)."""
    L, C, H, nh, nkv, V = SHAPES[shape][:6]
    cfg = ModelConfig(model_type="llama", vocab_size=V, hidden_size=C, num_hidden_layers=L, num_attention_heads=nh,
                      num_key_value_heads=nkv, head_dim=C // nh, intermediate_size=H, max_position_embeddings=4096,
                      norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False)
    with torch.device(device):
        model = build_model(cfg)
        model.init_weights()
    return model.train()


def nanolisa_steps(model, method: str, gamma: int, device: torch.device, shape: str, steps: int,
                   probe: Probe) -> tuple[float | None, float | None]:
    """Train `model` as train.py does (kernels, activation_memory, bf16 autocast): (peak GB, tokens/s)."""
    use_kernels(model, "auto", torch.bfloat16, device)
    lean(model)
    lisa = LISA(model, n_layers=gamma, interval=1, seed=0) if method == "lisa" else None
    if method == "lora":
        from nanolisa.lora import apply_lora, mark_only_lora_trainable
        apply_lora(model, r=8, alpha=16, targets="all-linear")
        mark_only_lora_trainable(model)
    opt = AdamW(param_groups(model, weight_decay=0.0), lr=1e-5, weight_decay=0.0)
    B, T, V = SHAPES[shape][6], SHAPES[shape][7], SHAPES[shape][5]

    def step(i):
        if lisa:
            lisa.maybe_switch(i, opt)
        ids = torch.randint(0, V, (B, T), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = next_token_nll(model, ids, ids).sum() / (B * (T - 1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _timed(step, steps, B * T, probe)


def peer_steps(model, method: str, device: torch.device, shape: str, steps: int,
               probe: Probe) -> tuple[float | None, float | None]:
    """The peers' stack as ../shared/bench/peer_stack.py runs it, on the device in bf16 autocast."""
    layers = model.model.layers
    if method == "lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    B, T, V = SHAPES[shape][6], SHAPES[shape][7], SHAPES[shape][5]

    def step(i):
        if method == "lisa":  # LMFlow's DynamicLayerActivationCallback, in effect
            for layer in layers:
                layer.requires_grad_(False)
            for j in random.sample(range(len(layers)), 1):
                layers[j].requires_grad_(True)
        ids = torch.randint(0, V, (B, T), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _timed(step, steps, B * T, probe)


def _timed(step, steps: int, tokens: int, probe: Probe) -> tuple[float | None, float | None]:
    """Run steps; (peak GB over all of them, tokens/s over the steps after the first two)."""
    t0 = None
    for i in range(steps):
        if i == 2:
            torch.cuda.synchronize() if probe.gpu else None
            t0 = time.perf_counter()
        step(i)
    if not probe.gpu:
        return None, None
    torch.cuda.synchronize()
    return probe.peak_gb(), round(tokens * (steps - 2) / (time.perf_counter() - t0), 1)


def seven_b_rows(device: torch.device, probe: Probe, smoke: bool) -> list[dict]:
    """4. LISA gamma=2 on a Llama-2-7B-shaped model, bf16 autocast, 2048 tokens."""
    shape = "tiny" if smoke else "7b"
    probe.reset()
    torch.manual_seed(0)
    model = llama(shape, device)
    peak, tps = nanolisa_steps(model, "lisa", 2, device, shape, 2 if smoke else 5, probe)
    del model
    return [row("7B LISA", f"{shape} LISA g=2 bf16, {SHAPES[shape][6]} x {SHAPES[shape][7]}", True,
                nanolisa_peak_gb=peak, nanolisa_tokens_per_s=tps)]


def peer_rows(device: torch.device, probe: Probe, smoke: bool) -> list[dict]:
    """5. nanolisa against the peers' stack at shape c, bf16 autocast, one method after another."""
    import transformers as tf
    shape = "tiny" if smoke else "c"
    L, C, H, nh, nkv, V = SHAPES[shape][:6]
    out = []
    for method in ("full", "lora", "lisa"):
        figures = {}
        for stack in ("nanolisa", "peers"):
            probe.reset()
            torch.manual_seed(0)
            random.seed(0)
            steps = 3 if smoke else 12
            if stack == "nanolisa":
                figures[stack] = nanolisa_steps(llama(shape, device), method, 1, device, shape, steps, probe)
            else:
                cfg = tf.LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=H, num_hidden_layers=L,
                                     num_attention_heads=nh, num_key_value_heads=nkv)
                with torch.device(device):
                    model = tf.LlamaForCausalLM(cfg)
                figures[stack] = peer_steps(model, method, device, shape, steps, probe)
        (pn, tn), (pp, tp) = figures["nanolisa"], figures["peers"]
        out.append(row("vs peers", f"shape {shape} {method} bf16", True, nanolisa_peak_gb=pn, reference_peak_gb=pp,
                       nanolisa_tokens_per_s=tn, reference_tokens_per_s=tp,
                       ratio=round(tn / tp, 2) if tn and tp else None))
    return out


def table(rows: list[dict]) -> str:
    keys = ["section", "case", "ok", "error", "loss_full", "loss_fused", "nanolisa_ms", "reference_ms",
            "nanolisa_peak_gb", "reference_peak_gb",
            "nanolisa_tokens_per_s", "reference_tokens_per_s", "ratio", "note"]
    keys = [k for k in keys if any(k in r for r in rows)]
    cell = lambda v: "-" if v is None else ("pass" if v is True else "FAIL" if v is False else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: every step, no timings")
    ap.add_argument("--json", help="also write every row, one JSON object a line, here")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: kernels, attention, "
                    "loss, 7b, peers")
    a = ap.parse_args()
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU here; --cpu-smoke runs the same steps on tiny shapes", file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.cpu_smoke else "cuda")
    probe, rows = Probe(device), []
    sections = {"kernels": lambda: kernel_rows(device, a.cpu_smoke),
                "attention": lambda: attention_rows(device, probe, a.cpu_smoke),
                "loss": lambda: fused_loss_rows(device, probe, a.cpu_smoke),
                "7b": lambda: seven_b_rows(device, probe, a.cpu_smoke),
                "peers": lambda: peer_rows(device, probe, a.cpu_smoke)}
    for name, run in sections.items():
        if name in a.skip.split(","):
            continue
        t = time.perf_counter()
        rows += run()
        print(f"{name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny shapes, no timings)"
    print(f"nanolisa GPU check on {where}, torch {torch.__version__}\n")
    print(table(rows))
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(a.json + ".tmp", a.json)
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
