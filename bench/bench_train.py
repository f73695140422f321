#!/usr/bin/env python3
"""nanolisa's side of the training benchmark: the twin of ../shared/bench/peer_stack.py
(the peers' stack, in the shared folder beside the project checkout).

Same flags, same measurements, same one-line JSON output, so a nanolisa row and a peers' row compare 1:1.
A random Llama-shaped nanolisa model (no download), nanolisa's AdamW over ALL parameters (trainer.param_groups),
the loss from nanolisa.loss.next_token_nll on random token ids, one mode per process (peak RSS is per process),
with kernels chosen as train.py chooses them (--kernels auto: the chunked linear + cross-entropy on CPU; `none`
keeps the plain model, whose loss builds the full logits):
  full   all parameters trained
  lora   nanolisa.lora r=8, alpha 16, on all linear layers (as peer_stack.py's peft row)
  lisa   nanolisa.lisa.LISA: embedding + head always trained, --lisa-layers blocks re-sampled every
         --interval steps; frozen blocks lose their grads and AdamW state at each switch

Printed: peak_rss_mb (ru_maxrss of the whole process), tokens_per_s (steps after the first), the number of
optimizer state entries; and, beside them, the parameter counts, the bytes that weights + grads + AdamW state
should take in theory for this mode, and the bytes autograd saved for backward (activations) in one forward.
For lisa also the peak RSS right after the step of the first switch and after the step of the last switch
(with --interval 1 every step switches): "memory stays flat across switches" means these two are close.

Usage (one mode per process; bench/run_all.py runs the whole comparison):
  .venv/bin/python bench/bench_train.py --mode lisa --lisa-layers 1 --interval 1 --layers 8 --hidden 1024 \
      --ffn 2816 --heads 8 --kv-heads 4 --vocab 300 --batch 2 --seq 128 --steps 11
"""
import argparse
import json
import os
import random
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nanolisa.activation_memory import lean  # noqa: E402
from nanolisa.adamw import AdamW  # noqa: E402
from nanolisa.config import ModelConfig  # noqa: E402
from nanolisa.kernels import use_kernels  # noqa: E402
from nanolisa.lisa import LISA  # noqa: E402
from nanolisa.model import build_model  # noqa: E402
from nanolisa.loss import next_token_nll  # noqa: E402
from nanolisa.trainer import param_groups  # noqa: E402

MB = 1024 * 1024


class PeakRSS:
    """Peak resident set per step, and over the whole process.

    The whole-process peak is what peer_stack.py reports: ru_maxrss. To see the peak of each step as well,
    the kernel's high-water mark (VmHWM) is read at the end of each step and then reset to the current RSS
    (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0). The reset lowers ru_maxrss too, so the process peak is
    kept here as the running maximum of the per-step peaks -- the same number ru_maxrss gives without resets.
    Where the reset is not allowed, per-step peaks fall back to the running process peak."""

    def __init__(self):
        self.process = self.read()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.can_reset = True
        except OSError:
            self.can_reset = False

    @staticmethod
    def read() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB -> MB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def end_step(self) -> float:
        """The peak since the previous call (MB); updates the process peak."""
        peak = self.read()
        self.process = max(self.process, peak)
        if self.can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return peak


def rss_mb() -> float:
    """The resident set right now (second field of /proc/self/statm, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in one forward + loss: the activation memory of a training step.

    Counted per distinct storage, since many saved tensors are views of one buffer; the parameters
    themselves (saved by every Linear whose input needs a gradient) are not activations and are left out."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = next_token_nll(model, ids, ids).sum()
    del loss
    return sum(seen.values())


def bench_model(a: argparse.Namespace) -> torch.nn.Module:
    """The random Llama-shaped model of the shape flags, in training mode (the global RNG seeds it)."""
    cfg = ModelConfig(model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads,
                      intermediate_size=a.ffn, max_position_embeddings=max(2048, a.seq), norm_eps=1e-6,
                      hidden_act="silu", tie_word_embeddings=False)
    model = build_model(cfg)
    model.init_weights()
    model.gradient_checkpointing = a.grad_checkpointing
    return model.train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["full", "lora", "lisa"], required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=300)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--interval", type=int, default=1, help="LISA: optimizer steps between layer switches")
    ap.add_argument("--lisa-layers", type=int, default=1, help="LISA: blocks trained at a time (gamma)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--freeze-embeddings", action="store_true",
                    help="LISA: do not train the embedding, so backward stops at the lowest active block")
    ap.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton", "none"],
                    help="nanolisa.kernels.use_kernels, as train.py --kernels; none: the plain model (full logits)")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute each block's activations in backward (not in peer_stack.py; off by default)")
    ap.add_argument("--checkpoint-frozen", action="store_true",
                    help="LISA: recompute the frozen blocks' activations in backward (train.py --checkpoint-frozen)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block and AdamW's per-tensor "
                    "step (train.py --compile); tokens/s counts the steps after the first, which compiles")
    ap.add_argument("--plain", action="store_true",
                    help="model.py's plain autograd, without nanolisa/activation_memory.py (the 'before' figures)")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be at least 2 (tokens/s is measured over the steps after the first)")

    base = rss_mb()  # the process before the model exists: Python + torch + nanolisa imports
    torch.manual_seed(0)
    random.seed(0)
    model = bench_model(a)
    kernels = use_kernels(model, a.kernels) if a.kernels != "none" else "none"
    if not a.plain:
        lean(model, a.checkpoint_frozen)  # as trainer.setup does (nanolisa/activation_memory.py)
    if a.compile:
        from nanolisa.kernels.compile import compile_blocks
        compile_blocks(model)
    model.train()

    lisa = None
    if a.mode == "lisa":
        lisa = LISA(model, n_layers=a.lisa_layers, interval=a.interval, seed=0,
                    train_embeddings=not a.freeze_embeddings)
    elif a.mode == "lora":
        from nanolisa.lora import apply_lora, mark_only_lora_trainable
        apply_lora(model, r=8, alpha=16, targets="all-linear")
        mark_only_lora_trainable(model)
    # Over ALL parameters, as trainer.py does: AdamW keeps state only for those with a gradient.
    opt = AdamW(param_groups(model, weight_decay=0.0), lr=a.lr, weight_decay=0.0)
    if a.compile:  # as trainer.setup does: AdamW's step per tensor, one fused pass
        from nanolisa.kernels.compile import compile_adamw
        compile_adamw(opt)

    # Weights + grads + AdamW m and v, in theory. The trainable set is the largest one seen over the run
    # (for LISA it changes at every switch; blocks are the same size, so any step is representative).
    all_bytes = nbytes(model.parameters())
    max_trainable = max_trainable_n = 0

    t0, rss_by_step, step_peaks, active, switches = None, [], [], [], 0
    peak_first = peak_last = None
    peaks = PeakRSS()
    for step in range(a.steps):
        switched = lisa.maybe_switch(step, opt) if lisa else False
        switches += switched
        if step == 1:
            t0, c0 = time.perf_counter(), time.process_time()
        ids = torch.randint(0, a.vocab, (a.batch, a.seq))  # (B, T)
        loss_sum = next_token_nll(model, ids, ids).sum()
        (loss_sum / (ids.numel() - ids.size(0))).backward()
        with_grad = [p for p in model.parameters() if p.grad is not None]
        max_trainable = max(max_trainable, nbytes(with_grad))
        max_trainable_n = max(max_trainable_n, sum(p.numel() for p in with_grad))
        opt.step()
        opt.zero_grad(set_to_none=True)
        rss_by_step.append(round(rss_mb()))
        step_peaks.append(round(peaks.end_step()))
        if lisa:
            active.append(lisa.active[0] if len(lisa.active) == 1 else list(lisa.active))
        if switched:  # the process peak so far, as ru_maxrss would read right now
            if peak_first is None:
                peak_first = peaks.process
            peak_last = peaks.process
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peaks.process
    tokens = a.batch * a.seq * (a.steps - 1)

    out = {"mode": a.mode + (f"-g{a.lisa_layers}" if lisa else "") + ("+ckpt" if a.grad_checkpointing else "") + ("+frozen-emb" if a.freeze_embeddings else "")
                   + ("+ckpt-frozen" if a.checkpoint_frozen else "") + ("+plain" if a.plain else "")
                   + ("+compile" if a.compile else ""),
           "kernels": kernels,
           "peak_rss_mb": round(peak),
           "base_rss_mb": round(base),
           "tokens_per_s": round(tokens / dt, 1),
           # per CPU-second of this process (all threads): less disturbed by other jobs on a shared machine
           "tokens_per_cpu_s": round(tokens / cpu, 1),
           "optimizer_state_tensors": sum(1 for s in opt.state.values() if s),
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "trainable_m": round(max_trainable_n / 1e6, 2),
           # weights + (grad + m + v) for each trainable parameter
           "theory_state_mb": round((all_bytes + 3 * max_trainable) / MB),
           "rss_by_step_mb": rss_by_step,  # resident set after each step (after zero_grad)
           "step_peak_mb": step_peaks}  # peak resident set within each step
    if lisa:
        out.update(active_by_step=active, switches=switches, peak_rss_after_first_switch_mb=round(peak_first),
                   peak_rss_after_last_switch_mb=round(peak_last),
                   flat_ratio=round(peak_last / peak_first, 3))
    # After the peak is read: one more forward, counting what autograd saves for backward.
    out["saved_activations_mb"] = round(saved_activation_bytes(model, torch.randint(0, a.vocab, (a.batch, a.seq)))
                                        / MB)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
