"""The training loop behind train.py: full fine-tuning, LISA or LoRA, with exact resume.

One optimizer step, in order (the loop in `train` has one comment per stage):
  1. LISA: every `interval` steps sample new active blocks (nanolisa/lisa.py); frozen blocks lose their
     gradients and optimizer state at once, so memory stays flat.
  2. Set the learning rate from the schedule (linear warmup, then cosine / linear decay to min_lr, or constant).
  3. Forward and backward over `grad_accum` micro-batches. The loss is the mean over every loss-bearing
     token of the whole step (not a mean of per-batch means), so accumulation equals one big batch.
  4. Stop on a non-finite loss, before it reaches the weights.
  5. Clip the global gradient norm, AdamW step (nanolisa/adamw.py), drop the gradients.
  6. Log; now and then evaluate on held-out data and write a resume checkpoint (nanolisa/resume.py).
The finished run writes a Hugging Face model directory (or a PEFT adapter) to --out.

One process, one device. The seams for several processes: the data is served per (rank, world_size)
by `Batches`, LISA's sampler has its own seeded RNG so every rank would draw the same blocks, and the
token count of step 3 is the one number ranks would have to agree on.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time

import torch

from nanolisa.adamw import AdamW
from nanolisa.config import DTYPES
from nanolisa.data import Batches, read_dataset, tokenize_dataset
from nanolisa.errors import UserError
from nanolisa.evaluate import nll
from nanolisa.lisa import LISA
from nanolisa.lora import apply_lora, mark_only_lora_trainable, merge_lora, save_adapter
from nanolisa.loss import count_loss_tokens, next_token_nll
from nanolisa.plot import plot_run
from nanolisa.pretrained import load_pretrained, save_pretrained
from nanolisa.progress import MetricsLog, Progress
from nanolisa.resume import (CHECKPOINTS, find_resume_checkpoint, load_checkpoint, remove_checkpoints,
                             save_checkpoint)
from nanolisa.runtime import autocast, default_dtype, pick_device, set_threads
from nanolisa.train_config import TrainConfig


def train(cfg: TrainConfig) -> dict:
    """Run the whole fine-tune described by cfg; returns the final metrics."""
    # Settings; --out is checked before anything is loaded or written.
    cfg = cfg.with_defaults()
    cfg.validate()
    resume_from = find_resume_checkpoint(cfg)
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    amp_dtype = DTYPES[cfg.dtype or default_dtype(device)]
    amp = autocast(device, amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # Model in fp32 (autocast runs the matmuls in bf16/fp16 when asked), then which parameters train.
    model, tokenizer = load_pretrained(cfg.model, dtype=torch.float32, device=device)
    model.gradient_checkpointing = cfg.grad_checkpointing
    lisa = setup_method(model, cfg)
    model.train()

    batches, eval_examples = load_data(cfg, tokenizer)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(batches) / cfg.grad_accum))
    eval_every = every(cfg.eval_every, total) if eval_examples is not None else 0
    save_every = every(cfg.save_every, total)
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = load_checkpoint(resume_from, model, optimizer, lisa, batches) if resume_from else 0

    # While the run lasts its metrics live beside its checkpoints, so a run that fails leaves an earlier
    # run's files in --out untouched; the finished run moves them to --out/metrics.jsonl.
    log = MetricsLog(cfg.log or os.path.join(cfg.out, CHECKPOINTS, "metrics.jsonl"),
                     resume_step=start if resume_from else None)
    progress = Progress(total, start, cfg.quiet)
    data = iter(batches)
    last_checkpoint = resume_from
    if eval_every and start == 0:
        log.write({"step": 0, "eval_loss": held_out_loss(model, eval_examples, cfg.batch_size, amp)})
    clock = time.perf_counter()
    for step in range(start, total):
        # 1. LISA: re-sample the active blocks every `interval` steps.
        if lisa:
            lisa.maybe_switch(step, optimizer)
        # 2. Learning rate from the schedule.
        lr = lr_at(step, total, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # 3. Forward and backward over the micro-batches of this step.
        micro = [next(data) for _ in range(cfg.grad_accum)]
        loss = forward_backward(model, micro, device, amp, scaler)
        # 4. A non-finite loss never reaches the weights.
        if not math.isfinite(loss):
            progress.close()
            kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
            raise UserError(f"loss became {loss} at step {step + 1}; stopped ({kept}). "
                            f"Try a lower --lr or --dtype fp32/bf16")
        # 5. Clip, update, drop the gradients.
        grad_norm = update(model, optimizer, scaler, cfg.clip)
        # 6. Log, evaluate, checkpoint.
        done, now = step + 1, time.perf_counter()
        tokens_per_s = sum(b["input_ids"].numel() for b in micro) / max(now - clock, 1e-9)
        clock = now
        row = {"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
               "tokens_per_s": round(tokens_per_s, 1), **({"active": list(lisa.active)} if lisa else {})}
        log.write(row)
        progress.update(done, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:.0f}",
                               **({"active": lisa.active} if lisa else {})})
        if eval_every and (done % eval_every == 0 or done == total):
            eval_loss = held_out_loss(model, eval_examples, cfg.batch_size, amp)
            log.write({"step": done, "eval_loss": eval_loss})
            progress.write(f"step {done}: eval_loss={eval_loss:.4f}")
        if save_every and done % save_every == 0 and done < total:
            last_checkpoint = save_checkpoint(cfg.out, done, model, optimizer, lisa, batches, cfg)
    progress.close()
    log.close()

    finish(model, tokenizer, cfg, log, lisa, total)
    return summary(log.rows)


# ----------------------------------------------------------------------------------------------------------
# The stages of a run, in the order train() calls them.


def setup_method(model, cfg: TrainConfig) -> LISA | None:
    """Decide which parameters train: LISA (returns its sampler), LoRA adapters, or everything (full)."""
    if cfg.method == "lisa":
        return LISA(model, cfg.lisa_layers, cfg.interval, seed=cfg.seed,
                    train_embeddings=not cfg.freeze_embeddings, train_head=not cfg.freeze_head)
    if cfg.method == "lora":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                   rslora=cfg.rslora, dora=cfg.dora)
        mark_only_lora_trainable(model, modules_to_save=cfg.lora_modules_to_save)
    return None


def load_data(cfg: TrainConfig, tokenizer) -> tuple[Batches, list | None]:
    """The training batches, and the held-out examples (None without held-out data)."""
    tok_args = dict(seq_len=cfg.seq_len, template=cfg.template, train_on_prompt=cfg.train_on_prompt)
    train_data = tokenize_dataset(read_dataset(cfg.data), tokenizer, **tok_args)
    if train_data.num_truncated:
        print(f"note: {train_data.num_truncated} of {len(train_data.examples)} examples were longer than "
              f"--seq-len {cfg.seq_len} and were truncated", file=sys.stderr)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = Batches(train_data, cfg.batch_size, seed=cfg.seed, shuffle=True, pack=cfg.pack, pad_id=pad_id)
    eval_path = cfg.eval_data or (cfg.data + ":test" if cfg.data in ("demo", "demo:conversation") else None)
    if not eval_path or cfg.eval_every == 0:
        return batches, None
    return batches, tokenize_dataset(read_dataset(eval_path), tokenizer, **tok_args).examples


def every(flag: int, total: int) -> int:
    """--eval-every / --save-every: N steps, 0 = never, -1 = ten times over the run."""
    return flag if flag >= 0 else max(1, total // 10)


def param_groups(model, weight_decay: float) -> list[dict]:
    """All parameters (LISA freezes and unfreezes them; AdamW skips frozen ones). As usual, no weight decay
    on biases, norms and other 1-D parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then decay from lr to min_lr by the end of training."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay


def forward_backward(model, micro: list[dict], device: torch.device, amp, scaler) -> float:
    """Accumulate the gradients of one optimizer step over its micro-batches; returns the step's loss,
    the mean NLL over all its loss-bearing tokens."""
    n_tokens = max(sum(count_loss_tokens(b["labels"]) for b in micro), 1)
    total = torch.zeros((), device=device)
    for b in micro:
        position_ids = b["position_ids"].to(device) if b["position_ids"] is not None else None
        with amp:
            loss = next_token_nll(model, b["input_ids"].to(device), b["labels"].to(device),
                                  position_ids).sum() / n_tokens
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    return float(total)  # the one host sync of the step


def update(model, optimizer: AdamW, scaler, clip: float) -> float:
    """Clip the gradient norm (clip 0: no clipping), take the AdamW step, drop the gradients; returns the
    gradient norm before clipping (nan when not clipping)."""
    if scaler:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if clip > 0 else float("nan")
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def held_out_loss(model, examples, batch_size: int, amp) -> float:
    """Mean loss per loss-bearing token over the held-out examples (the metric eval.py reports)."""
    with amp:
        total, count = nll(model, examples, batch_size)
    return total / max(count, 1)


def finish(model, tokenizer, cfg: TrainConfig, log: MetricsLog, lisa: LISA | None, total: int) -> None:
    """Write the result: a Hugging Face model directory in --out (a PEFT adapter for LoRA, plus the merged
    model with --merge), the metrics and the loss plot; then remove the run's resume checkpoints."""
    if cfg.method == "lora":
        save_adapter(model, cfg.out, base_model_name_or_path=cfg.model)
        if cfg.merge:
            save_pretrained(merge_lora(model), tokenizer, os.path.join(cfg.out, "merged"))
    else:
        save_pretrained(model, tokenizer, cfg.out)
    if not cfg.log:
        os.replace(log.path, os.path.join(cfg.out, "metrics.jsonl"))
    remove_checkpoints(cfg.out)
    if cfg.plot:
        plot_run(log.rows, lisa.history if lisa else [], len(model.blocks), total,
                 os.path.join(cfg.out, "loss.png"))


def summary(rows: list[dict]) -> dict:
    """The last metrics row, plus the first and last held-out loss."""
    final = dict(rows[-1]) if rows else {}
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    if evals:
        final["first_eval_loss"], final["eval_loss"] = evals[0], evals[-1]
    return final
