"""The training loop behind train.py: full fine-tuning, LISA or LoRA, with exact resume.

One step, in order:
  1. LISA: every `interval` steps sample new active blocks (nanolisa/lisa.py); frozen blocks lose their
     gradients and optimizer state at once, so memory stays flat.
  2. Set the learning rate from the schedule (linear warmup, then cosine / linear decay to min_lr, or constant).
  3. Gradient accumulation over `grad_accum` micro-batches. The loss is the mean over every loss-bearing
     token of the whole step (not a mean of per-batch means), so accumulation equals one big batch.
  4. Clip the global gradient norm, AdamW step (nanolisa/adamw.py), drop the gradients.

A checkpoint (out/checkpoints/step-NNNNNNN/) holds everything a bit-exact resume needs, in safetensors and
JSON only: the trainable weights (all weights for full and LISA; the adapters for LoRA), the AdamW moments
keyed by parameter name, the LISA sampler, the data order and position, and the RNG states. It is written
to a temporary directory and renamed, so a run killed at any moment resumes from the last complete one.

Nothing here assumes one process: the data is sharded by (rank, world_size) and LISA's sampler has its
own seeded RNG, so every rank draws the same blocks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from nanolisa.adamw import AdamW
from nanolisa.checkpoint import load_pretrained, save_pretrained
from nanolisa.errors import UserError
from nanolisa.evaluate import nll
from nanolisa.kernels import use_kernels
from nanolisa.lisa import LISA
from nanolisa.loss import count_loss_tokens, next_token_nll
from nanolisa.presets import RECIPES

METHODS = ("lisa", "lora", "full")
SCHEDULES = ("cosine", "linear", "constant")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KEEP_CHECKPOINTS = 2
# Flags that may change when a run is resumed; any other difference means it is not the same run.
RESUMABLE_CHANGES = {"resume", "save_every", "eval_every", "log", "out", "plot", "device", "quiet", "kernels"}


@dataclass
class TrainConfig:
    """Every setting of a run; train.py's flags map one to one onto these fields."""
    model: str = "tiny"
    data: str = "demo"
    eval_data: str | None = None
    out: str = "out"
    method: str = "lisa"
    lisa_layers: int = 1
    interval: int = 20
    freeze_embeddings: bool = False
    freeze_head: bool = False
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    lora_modules_to_save: list[str] = field(default_factory=list)
    rslora: bool = False
    dora: bool = False
    merge: bool = False
    steps: int | None = None  # None: one epoch (or --epochs), or the preset's recipe
    epochs: float | None = None
    batch_size: int | None = None  # None: 4, or the preset's recipe
    grad_accum: int = 1
    seq_len: int = 256
    pack: bool = False
    template: str | None = None
    train_on_prompt: bool = False
    lr: float | None = None  # None: 5e-5 (2e-4 for LoRA), or the preset's recipe
    min_lr: float = 0.0
    warmup: int | None = None  # None: 0, or the preset's recipe
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0
    dtype: str | None = None
    grad_checkpointing: bool = False
    seed: int = 0
    eval_every: int = -1  # -1: ten evaluations over the run
    save_every: int = -1  # -1: ten checkpoints over the run
    resume: bool = False
    log: str | None = None
    plot: bool = True
    device: str | None = None
    kernels: str = "auto"
    quiet: bool = False

    def with_defaults(self) -> "TrainConfig":
        """Fill the settings left at None: a built-in preset's recipe (nanolisa/presets.py), otherwise the
        usual values for fine-tuning a pretrained checkpoint."""
        recipe = {} if os.path.isdir(self.model) else RECIPES.get(self.model, {})
        usual = {"lr": 2e-4 if self.method == "lora" else 5e-5, "warmup": 0, "batch_size": 4,
                 "steps": None if self.epochs else recipe.get("steps")}
        filled = {k: recipe.get(k, v) for k, v in usual.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.lisa_layers < 0:
            raise UserError(f"--lisa-layers must be >= 0, got {self.lisa_layers}")
        if self.interval < 1:
            raise UserError(f"--interval must be >= 1, got {self.interval}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.dtype is not None and self.dtype not in AMP_DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}: choose one of {', '.join(AMP_DTYPES)}")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.method == "lora" and self.lora_r < 1:
            raise UserError(f"--lora-r must be >= 1, got {self.lora_r}")


def return_freed_memory_to_os() -> None:
    """Ask glibc to serve large allocations with mmap, so memory freed at a LISA switch goes back to the OS.

    With glibc's default (adaptive) threshold, the 2-16 MB gradient and Adam-state tensors come from the
    heap, and freeing them at every switch fragments it: resident memory crept up 24% over 11 switches on
    the bench's 85M model. With a fixed 128 KiB threshold it stayed within 3.4% (bench/RESULTS.md). On
    CUDA this does not matter (tensors live in torch's caching allocator); elsewhere it is a no-op."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1024 * 1024)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then decay from lr to min_lr by the end of training."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay


def held_out_loss(model, examples, batch_size: int, amp) -> float:
    """Mean loss per loss-bearing token over the held-out examples (the metric eval.py reports)."""
    with amp:
        total, count = nll(model, examples, batch_size)
    return total / max(count, 1)


def _maybe(t, device):
    return None if t is None else t.to(device)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints for resuming. Safetensors and JSON only: no pickle is ever written or read.


def _checkpoint_dirs(out: str) -> list[str]:
    root = os.path.join(out, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and
                   os.path.isfile(os.path.join(root, n, "trainer_state.json")))
    return [os.path.join(root, n) for n in names]


def save_checkpoint(out: str, step: int, model, optimizer, lisa, batches, cfg: TrainConfig) -> str:
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-step-", dir=root)
    names = {p: n for n, p in model.named_parameters()}
    trainable = {n: p.detach().clone() for p, n in names.items() if p.requires_grad or cfg.method != "lora"}
    save_file(trainable, os.path.join(tmp, "weights.safetensors"))
    opt = {f"{names[p]}::{k}": v.detach().clone() for p, s in optimizer.state.items() for k, v in s.items()}
    save_file(opt, os.path.join(tmp, "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # LoRA dropout on a GPU draws from the CUDA generator
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(tmp, "rng.safetensors"))
    state = {"step": step, "config": dataclasses.asdict(cfg), "data": batches.state_dict(),
             "lisa": lisa.state_dict() if lisa else None, "python_rng": _jsonable(random.getstate())}
    with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
        json.dump(state, f)
    final = os.path.join(root, f"step-{step:07d}")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def load_checkpoint(path: str, model, optimizer, lisa, batches) -> dict:
    state = json.load(open(os.path.join(path, "trainer_state.json")))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in load_file(os.path.join(path, "weights.safetensors")).items():
            params[n].copy_(t)
    if lisa:
        lisa.load_state_dict(state["lisa"], optimizer)
    optimizer.state.clear()
    for key, t in load_file(os.path.join(path, "optimizer.safetensors")).items():
        n, k = key.split("::")
        optimizer.state[params[n]][k] = t.to(params[n].device) if k != "step" else t
    batches.load_state_dict(state["data"])
    rng = load_file(os.path.join(path, "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_tuplify(state["python_rng"]))
    return state


def check_out_dir(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix two different runs in --out."""
    ckpts = _checkpoint_dirs(cfg.out)
    if not ckpts:
        return None
    if not cfg.resume:
        raise UserError(f"{cfg.out} already holds a run's checkpoints: pass --resume to continue it, "
                        f"or choose another --out")
    saved = json.load(open(os.path.join(ckpts[-1], "trainer_state.json")))["config"]
    now = dataclasses.asdict(cfg)
    diff = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{cfg.out} holds a run with different settings ({k}: {saved.get(k)!r} there, "
                        f"{now[k]!r} now); use the same flags to resume, or another --out")
    return ckpts[-1]


# ----------------------------------------------------------------------------------------------------------
# The run.


def param_groups(model, weight_decay: float) -> list[dict]:
    """All parameters (LISA freezes and unfreezes them; AdamW skips frozen ones). As usual, no weight decay
    on biases, norms and other 1-D parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Progress:
    """tqdm on a terminal; plain log lines otherwise (CI logs, nohup, pipes)."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.every = max(1, total // 20)
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def update(self, step: int, info: dict) -> None:
        text = " ".join(f"{k}={v}" for k, v in info.items())
        if self.tty:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif not self.quiet and (step % self.every == 0 or step == 1):
            print(f"step {step}: {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.tty:
            self.bar.write(text)
        elif not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            self.bar.close()


def train(cfg: TrainConfig) -> dict:
    """Run the whole fine-tune described by cfg; returns the final metrics."""
    from nanolisa.data import Batches, read_dataset, tokenize_dataset

    cfg = cfg.with_defaults()
    cfg.validate()
    resume_from = check_out_dir(cfg)  # before anything is loaded or written
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_name = cfg.dtype or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    amp_dtype = AMP_DTYPES[amp_name]
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type) if amp_name == "fp16" else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # Model: fp32 master weights; autocast runs the matmuls in bf16/fp16 when asked.
    model, tokenizer = load_pretrained(cfg.model, dtype=torch.float32, device=device)
    use_kernels(model, cfg.kernels)  # flash attention, RMSNorm, and the loss without full logits (kernels/)
    model.gradient_checkpointing = cfg.grad_checkpointing
    lisa = None
    if cfg.method == "lisa":
        lisa = LISA(model, cfg.lisa_layers, cfg.interval, seed=cfg.seed,
                    train_embeddings=not cfg.freeze_embeddings, train_head=not cfg.freeze_head)
    elif cfg.method == "lora":
        from nanolisa.lora import apply_lora, mark_only_lora_trainable
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                   rslora=cfg.rslora, dora=cfg.dora)
        mark_only_lora_trainable(model, modules_to_save=cfg.lora_modules_to_save)
    model.train()

    # Data.
    train_set = read_dataset(cfg.data)
    eval_path = cfg.eval_data or (cfg.data + ":test" if cfg.data in ("demo", "demo:conversation") else None)
    tok_args = dict(seq_len=cfg.seq_len, template=cfg.template, train_on_prompt=cfg.train_on_prompt)
    train_data = tokenize_dataset(train_set, tokenizer, **tok_args)
    if train_data.num_truncated:
        print(f"note: {train_data.num_truncated} of {len(train_data.examples)} examples were longer than "
              f"--seq-len {cfg.seq_len} and were truncated", file=sys.stderr)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = Batches(train_data, cfg.batch_size, seed=cfg.seed, shuffle=True, pack=cfg.pack, pad_id=pad_id)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(batches) / cfg.grad_accum))
    eval_every = cfg.eval_every if cfg.eval_every >= 0 else max(1, total // 10)  # default: 10 evaluations
    save_every = cfg.save_every if cfg.save_every >= 0 else max(1, total // 10)  # default: 10 checkpoints
    eval_examples = None
    if eval_path and eval_every:
        eval_examples = tokenize_dataset(read_dataset(eval_path), tokenizer, **tok_args).examples

    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer, lisa, batches)
        start = state["step"]
    # While the run lasts its metrics live beside its checkpoints, so a run that fails leaves an earlier
    # run's files in --out untouched; the finished run moves them to --out/metrics.jsonl.
    log_path = cfg.log or os.path.join(cfg.out, "checkpoints", "metrics.jsonl")
    log_rows = _read_log(log_path, upto=start) if resume_from else []
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log_file = open(log_path, "w")
    for row in log_rows:
        log_file.write(json.dumps(row) + "\n")

    def log(row: dict) -> None:
        log_rows.append(row)
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()

    progress = Progress(total, start, cfg.quiet)
    data_iter = iter(batches)
    last_ckpt = resume_from
    if eval_examples is not None and start == 0:
        log({"step": 0, "eval_loss": held_out_loss(model, eval_examples, cfg.batch_size, amp)})
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start, total):
        if lisa:
            lisa.maybe_switch(step, optimizer)
        lr = lr_at(step, total, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr

        micro = [next(data_iter) for _ in range(cfg.grad_accum)]
        n_loss_tokens = sum(count_loss_tokens(b["labels"]) for b in micro)
        step_loss = 0.0
        for b in micro:
            with amp:
                loss_sum = next_token_nll(model, b["input_ids"].to(device), b["labels"].to(device),
                                          _maybe(b["position_ids"], device)).sum()
            loss = loss_sum / max(n_loss_tokens, 1)
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item()
            tokens_since += b["input_ids"].numel()
        if not math.isfinite(step_loss):
            progress.close()
            kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written"
            raise UserError(f"loss became {step_loss} at step {step + 1}; stopped ({kept}). "
                            f"Try a lower --lr or --dtype fp32/bf16")
        if scaler:
            scaler.unscale_(optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip)) if cfg.clip > 0 else float("nan")
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        now = time.perf_counter()
        tps = tokens_since / max(now - t_last, 1e-9)
        t_last, tokens_since = now, 0
        row = {"step": done, "loss": round(step_loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
               "tokens_per_s": round(tps, 1)}
        if lisa:
            row["active"] = list(lisa.active)
        log(row)
        progress.update(done, {"loss": f"{step_loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tps:.0f}",
                               **({"active": lisa.active} if lisa else {})})
        if eval_examples is not None and (done % eval_every == 0 or done == total):
            eval_loss = held_out_loss(model, eval_examples, cfg.batch_size, amp)
            log({"step": done, "eval_loss": eval_loss})
            progress.write(f"step {done}: eval_loss={eval_loss:.4f}")
        if save_every and done % save_every == 0 and done < total:
            last_ckpt = save_checkpoint(cfg.out, done, model, optimizer, lisa, batches, cfg)
    progress.close()
    log_file.close()

    # The result: an HF model directory in --out (or a PEFT adapter for LoRA), plus the loss plot.
    if cfg.method == "lora":
        from nanolisa.lora import merge_lora, save_adapter
        save_adapter(model, cfg.out, base_model_name_or_path=cfg.model)
        if cfg.merge:
            save_pretrained(merge_lora(model), tokenizer, os.path.join(cfg.out, "merged"))
    else:
        save_pretrained(model, tokenizer, cfg.out)
    # The run is complete and its result saved: its resume checkpoints have done their job.
    if not cfg.log:
        os.replace(log_path, os.path.join(cfg.out, "metrics.jsonl"))
    shutil.rmtree(os.path.join(cfg.out, "checkpoints"), ignore_errors=True)
    if cfg.plot:
        from nanolisa.plot import plot_run
        plot_run(log_rows, lisa.history if lisa else [], len(model.blocks), total,
                 os.path.join(cfg.out, "loss.png"))
    final = dict(log_rows[-1]) if log_rows else {}
    evals = [r["eval_loss"] for r in log_rows if "eval_loss" in r]
    if evals:
        final["first_eval_loss"], final["eval_loss"] = evals[0], evals[-1]
    return final


def _read_log(path: str, upto: int) -> list[dict]:
    """The metrics rows of a resumed run up to its checkpoint step (later rows are redone)."""
    if not os.path.isfile(path):
        return []
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return [r for r in rows if r["step"] <= upto]
