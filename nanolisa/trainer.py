"""The training loop behind train.py: full fine-tuning, LISA or LoRA, on one process or many, with exact resume.

One optimizer step, in order (the loop in `run` has one comment per stage):
  1. LISA: every `interval` steps sample new active blocks (nanolisa/lisa.py); frozen blocks lose their
     gradients and optimizer state at once, so memory stays flat. Under DDP the wrapper is rebuilt over
     the blocks that train now (nanolisa/parallel.py).
  2. Set the learning rate from the schedule (linear warmup, then cosine / linear decay to min_lr, or constant).
  3. Forward and backward over `grad_accum` micro-batches. The loss is the mean over every loss-bearing
     token of the whole step on every rank (the token count is all-reduced; not a mean of per-batch or
     per-rank means), so accumulation and more ranks equal one big batch.
  4. Stop on a non-finite loss, before it reaches the weights.
  5. Clip the global gradient norm, AdamW step (nanolisa/adamw.py), drop the gradients.
  6. Log; now and then evaluate on held-out data and write a resume checkpoint (nanolisa/resume.py).
The finished run writes a Hugging Face model directory (or a PEFT adapter) to --out.

Several processes (`torchrun`): the same loop runs on every rank, each on its slice of every global batch
(nanolisa/data.py), with the model sharded by FSDP2 or replicated by DDP (nanolisa/parallel.py). Rank 0
alone prints progress and writes metrics, the plot and the final model; checkpoints are written by all
ranks together. SIGTERM (how schedulers pre-empt a job) finishes the current step on every rank, writes a
checkpoint and exits, so --resume continues bit-exactly.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from nanolisa.adamw import AdamW
from nanolisa.config import DTYPES, to_dtype
from nanolisa.data import Batches, read_dataset, tokenize_dataset
from nanolisa.errors import UserError
from nanolisa.evaluate import nll
from nanolisa.files import write_failure
from nanolisa.kernels import use_kernels
from nanolisa.lisa import LISA
from nanolisa.lora import apply_lora, load_adapter, mark_only_lora_trainable, merge_lora, save_adapter
from nanolisa.loss import count_loss_tokens, next_token_nll
from nanolisa.parallel import (World, all_sum, barrier, broadcast, check_same_on_all_ranks, close_world, grad_norm,
                               init_world, launched_world, replicate, shard)
from nanolisa.plot import plot_run
from nanolisa.presets import PRESETS
from nanolisa.pretrained import load_pretrained, save_pretrained, stored_dtype
from nanolisa.progress import MetricsLog, Progress
from nanolisa.resume import (CHECKPOINTS, find_resume_checkpoint, load_checkpoint, remove_checkpoints,
                             save_checkpoint)
from nanolisa.run_dir import RunDir
from nanolisa.runtime import autocast, default_dtype, set_threads
from nanolisa.templates import resolve_template
from nanolisa.train_config import TrainConfig


class Preempted(Exception):
    """SIGTERM stopped the run after a checkpoint; --resume continues it."""


def train(cfg: TrainConfig) -> dict:
    """Run the whole fine-tune described by cfg; returns the final metrics."""
    cfg = cfg.with_defaults()
    cfg.validate()
    world = launched_world()
    if world.distributed:
        cfg = dataclasses.replace(cfg, parallel=cfg.parallel or "fsdp")
        if cfg.parallel == "fsdp" and cfg.dtype == "fp16":
            raise UserError("--dtype fp16 is not supported with --parallel fsdp (no loss scaling there); "
                            "use --dtype bf16")
    elif cfg.parallel:
        print(f"note: --parallel {cfg.parallel} does nothing in a single process; start with torchrun",
              file=sys.stderr)
    check_inputs_exist(cfg)  # on every rank, before any rank waits for another
    run_dir = RunDir(cfg) if world.is_main else None
    finished = False
    try:
        if run_dir:
            run_dir.open()  # --out checked, created and locked before any model or data is loaded
        world, device = init_world(cfg.device)
        final = run(cfg, world, device)
        finished = True
        return final
    finally:
        if run_dir:
            run_dir.close(finished)
        close_world(clean=finished)


def check_inputs_exist(cfg: TrainConfig) -> None:
    """A missing --model, --data or --eval-data is one line before anything starts."""
    if not os.path.isdir(cfg.model) and cfg.model not in PRESETS:
        raise UserError(f"--model {cfg.model}: no such model directory (or preset: {', '.join(PRESETS)})")
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path is not None and not path.startswith("demo") and not os.path.exists(path):
            raise UserError(f"{flag} {path}: no such file or directory")


@dataclass
class Run:
    """Everything a run works with, built by `setup`."""
    cfg: TrainConfig
    world: World
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    optimizer: AdamW
    lisa: LISA | None
    batches: Batches
    eval_examples: list | None
    total: int  # optimizer steps of the whole run
    amp: object  # the autocast context (or nullcontext)
    scaler: torch.amp.GradScaler | None
    ddp: torch.nn.Module | None = None  # the DDP wrapper under --parallel ddp


def run(cfg: TrainConfig, world: World, device: torch.device) -> dict:
    """Set up, then train from the start or from the checkpoint --resume picks."""
    set_threads(cfg.threads)
    resume_from = broadcast(find_resume_checkpoint(cfg, world) if world.is_main else None, world)
    r = setup(cfg, world, device)
    start = load_checkpoint(resume_from, r.model, r.optimizer, r.lisa, r.batches, world) if resume_from else 0
    return loop(r, start, resume_from)


def setup(cfg: TrainConfig, world: World, device: torch.device) -> Run:
    """The model, which parameters train, how the ranks share it, the data and the optimizer."""
    amp_dtype = DTYPES[cfg.dtype or default_dtype(device)]
    # FSDP2 on GPUs runs bf16/fp16 through its own mixed-precision policy; elsewhere autocast does.
    mp_dtype = amp_dtype if cfg.parallel == "fsdp" and device.type == "cuda" and amp_dtype != torch.float32 else None
    amp = nullcontext() if mp_dtype else autocast(device, amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 and not mp_dtype else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # Model in fp32 (mixed precision runs the matmuls in bf16/fp16 when asked), then which parameters
    # train, then (several ranks) how the ranks share it.
    model, tokenizer = load_pretrained(cfg.model, dtype=torch.float32, device=device)
    use_kernels(model, cfg.kernels)  # flash attention, RMSNorm, the loss without full logits (kernels/)
    model.gradient_checkpointing = cfg.grad_checkpointing
    lisa = setup_method(model, cfg)
    torch.manual_seed(cfg.seed + world.rank)  # initialisation is the same on every rank, dropout is not
    if cfg.parallel == "fsdp":
        shard(model, mp_dtype)
    model.train()
    batches, eval_examples = load_data(cfg, tokenizer, world)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(batches) / cfg.grad_accum))
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Run(cfg, world, device, model, tokenizer, optimizer, lisa, batches, eval_examples, total, amp, scaler)


def loop(r: Run, start: int, last_checkpoint: str | None) -> dict:
    """The training loop, one comment per stage; then the result is written."""
    cfg, world, lisa, total = r.cfg, r.world, r.lisa, r.total
    eval_every = every(cfg.eval_every, total) if r.eval_examples is not None else 0
    save_every = every(cfg.save_every, total)
    # While the run lasts its metrics live beside its checkpoints, so a run that fails leaves an earlier
    # run's files in --out untouched; the finished run moves them to --out/metrics.jsonl.
    log = MetricsLog(cfg.log or os.path.join(cfg.out, CHECKPOINTS, "metrics.jsonl"),
                     resume_step=start if last_checkpoint else None) if world.is_main else None
    progress = Progress(total, start, cfg.quiet or not world.is_main)
    data, sigterm, clock = iter(r.batches), SigtermFlag(), time.perf_counter()
    if eval_every and start == 0:
        evaluate(r, 0, log, progress)
    for step in range(start, total):
        # 1. LISA: re-sample the active blocks every `interval` steps (the same on every rank).
        switched = lisa.maybe_switch(step, r.optimizer) if lisa else False
        if step == start and lisa:
            check_same_on_all_ranks(lisa.active, world, "LISA's active blocks")
        if cfg.parallel == "ddp" and (r.ddp is None or switched):
            r.ddp = replicate(r.model, first=r.ddp is None)
        # 2. Learning rate from the schedule.
        lr = lr_at(step, total, cfg)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        # 3. Forward and backward over the micro-batches of this step, on every rank.
        micro = [next(data) for _ in range(cfg.grad_accum)]
        loss, stop = all_sum([forward_backward(r, micro), float(sigterm.raised)], world, r.device)  # one sync
        # 4. A non-finite loss never reaches the weights.
        if not math.isfinite(loss):
            progress.close()
            raise UserError(f"loss became {loss} at step {step + 1}; stopped ({kept(last_checkpoint)}). "
                            f"Try a lower --lr or --dtype fp32/bf16")
        # 5. Clip, update, drop the gradients.
        norm = update(r)
        # 6. Log, evaluate, checkpoint.
        done, now = step + 1, time.perf_counter()
        tokens_per_s = world.world_size * sum(b["input_ids"].numel() for b in micro) / max(now - clock, 1e-9)
        clock = now
        row = {"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(norm, 6),
               "tokens_per_s": round(tokens_per_s, 1), **({"active": list(lisa.active)} if lisa else {})}
        if log:
            log.write(row)
        progress.update(done, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:.0f}",
                               **({"active": lisa.active} if lisa else {})})
        if eval_every and (done % eval_every == 0 or done == total):
            evaluate(r, done, log, progress)
        if done < total and (stop or save_every and done % save_every == 0):
            check_finite_weights(r.model, world, r.device, done, last_checkpoint)
            last_checkpoint = save_checkpoint(cfg.out, done, r.model, r.optimizer, lisa, r.batches, cfg, world)
            if stop:
                progress.close()
                raise Preempted(f"stopped by SIGTERM after step {done}; {last_checkpoint} holds the run: "
                                f"continue it with the same command plus --resume")
    progress.close()
    if log:
        log.close()
    check_finite_weights(r.model, world, r.device, total, last_checkpoint)
    finish(r, log)
    return summary(log.rows) if log else {}


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


def load_data(cfg: TrainConfig, tokenizer, world: World) -> tuple[Batches, list | None]:
    """This rank's training batches, and the held-out examples (None without held-out data). Rank 0 says
    how many records were read, kept, truncated and dropped, and why (unless --quiet)."""
    tok_args = dict(seq_len=cfg.seq_len, template=cfg.template, train_on_prompt=cfg.train_on_prompt)
    quiet = cfg.quiet or not world.is_main
    train_data = tokenize_dataset(read_dataset(cfg.data, quiet=quiet), tokenizer, **tok_args)
    if not quiet:
        print(f"note: {train_data.summary()}", file=sys.stderr)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = Batches(train_data, cfg.batch_size, seed=cfg.seed, shuffle=True, pack=cfg.pack, pad_id=pad_id,
                      rank=world.rank, world_size=world.world_size)
    eval_path = cfg.held_out_data()
    if not eval_path or cfg.eval_every == 0:
        return batches, None
    eval_data = tokenize_dataset(read_dataset(eval_path, quiet=quiet), tokenizer, **tok_args)
    if not quiet:
        print(f"note: {eval_data.summary()}", file=sys.stderr)
    return batches, eval_data.examples


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


def forward_backward(s: Run, micro: list[dict]) -> float:
    """Accumulate the gradients of one optimizer step over this rank's micro-batches; returns this rank's
    share of the step's loss (the shares of all ranks add up to the mean NLL over every loss-bearing token).

    DDP and FSDP2 average gradients over the ranks; the loss is scaled by world_size so that the result is
    the gradient of the global sum over the global token count. DDP skips its all-reduce on all but the
    last micro-batch (no_sync): the gradients are summed locally first."""
    n_tokens = torch.tensor(float(sum(count_loss_tokens(b["labels"]) for b in micro)), device=s.device)
    if s.world.distributed:
        dist.all_reduce(n_tokens)  # the global count stays on the device: no host sync
    scale = s.world.world_size / n_tokens.clamp(min=1)
    module = s.ddp or s.model
    total = torch.zeros((), device=s.device)
    for i, b in enumerate(micro):
        position_ids = b["position_ids"].to(s.device) if b["position_ids"] is not None else None
        sync = s.ddp.no_sync() if s.ddp is not None and i < len(micro) - 1 else nullcontext()
        with sync:
            with s.amp:
                loss = next_token_nll(module, b["input_ids"].to(s.device), b["labels"].to(s.device),
                                      position_ids).sum() * scale
            (s.scaler.scale(loss) if s.scaler else loss).backward()
        total += loss.detach()
    return float(total) / s.world.world_size


def update(s: Run) -> float:
    """Clip the gradient norm (--clip 0: no clipping), take the AdamW step, drop the gradients; returns the
    global gradient norm before clipping (nan when not clipping)."""
    if s.scaler:
        s.scaler.unscale_(s.optimizer)
    norm = float("nan")
    if s.cfg.clip > 0:
        params = [p for p in s.model.parameters() if p.grad is not None]
        total = grad_norm(params)
        torch.nn.utils.clip_grads_with_norm_(params, s.cfg.clip, total)
        norm = float(total)
    if s.scaler:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return norm


def evaluate(r: Run, step: int, log: MetricsLog | None, progress: Progress) -> None:
    """The mean loss per loss-bearing token over the held-out examples (the metric eval.py reports). Every
    rank scores all of them: FSDP2 needs every rank in every forward pass."""
    with r.amp:
        total, count = nll(r.model, r.eval_examples, r.cfg.batch_size)
    eval_loss = total / max(count, 1)
    if log:
        log.write({"step": step, "eval_loss": eval_loss})
    if step:
        progress.write(f"step {step}: eval_loss={eval_loss:.4f}")


def kept(last_checkpoint: str | None) -> str:
    return f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"


def check_finite_weights(model, world: World, device: torch.device, step: int, last_checkpoint: str | None) -> None:
    """Refuse to save weights holding inf or NaN (a finite loss can still end in a non-finite update)."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = sum(float(not torch.isfinite(p.detach()).all()) for p in local)
    if all_sum([bad], world, device)[0]:
        raise UserError(f"the weights became inf/NaN by step {step}; nothing was saved from them "
                        f"({kept(last_checkpoint)}). Try a lower --lr")


class SigtermFlag:
    """Remembers a SIGTERM (how schedulers pre-empt a job) instead of dying at once: the loop finishes its
    step, writes a checkpoint and stops, on every rank together."""

    def __init__(self):
        self.raised = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. train() called from a worker thread): keep the default
            pass

    def _handle(self, signum, frame) -> None:
        self.raised = True


def finish(r: Run, log: MetricsLog | None) -> None:
    """Write the result: a Hugging Face model directory in --out (a PEFT adapter for LoRA, plus the merged
    model with --merge), with the base's tokenizer files, the metrics and the loss plot; then remove the
    run's resume checkpoints. Every rank takes part (FSDP2 gathers each tensor from the shards); rank 0
    writes. Weights are written in the base checkpoint's dtype unless --save-dtype says otherwise."""
    cfg, model, tokenizer, main = r.cfg, r.model, r.tokenizer, r.world.is_main
    dtype = to_dtype(cfg.save_dtype) or stored_dtype(model)
    tokenizer.chat_template = result_chat_template(cfg, tokenizer)
    try:
        if cfg.method == "lora":
            save_adapter(model, cfg.out, base_model_name_or_path=cfg.model, writer=main, tokenizer=tokenizer,
                         dtype=to_dtype(cfg.save_dtype))
            if cfg.merge and main:
                if cfg.parallel == "fsdp":  # the model is in shards: merge the adapter just written into the base
                    model = load_adapter(load_pretrained(cfg.model, dtype=torch.float32)[0], cfg.out)
                save_pretrained(merge_lora(model), tokenizer, os.path.join(cfg.out, "merged"), dtype=dtype)
        else:
            save_pretrained(model, tokenizer, cfg.out, writer=main, dtype=dtype)
    except (OSError, SafetensorError) as e:
        raise write_failure(f"the final model to {cfg.out}", e) from None
    if main:
        if not cfg.quiet:
            print(written(cfg, dtype), file=sys.stderr)
        if not cfg.log:
            os.replace(log.path, os.path.join(cfg.out, "metrics.jsonl"))
        remove_checkpoints(cfg.out)
        if cfg.plot:
            plot_run(log.rows, r.lisa.history if r.lisa else [], len(model.blocks), r.total,
                     os.path.join(cfg.out, "loss.png"))
    barrier(r.world)


def written(cfg: TrainConfig, dtype: torch.dtype) -> str:
    """What finish() wrote, in one line."""
    how = f"{str(dtype).removeprefix('torch.')} ({'--save-dtype' if cfg.save_dtype else 'the base model dtype'})"
    if cfg.method != "lora":
        return f"wrote {cfg.out}: the model in {how}, with the base model's tokenizer files"
    merged = f"; the merged model in {how} in {os.path.join(cfg.out, 'merged')}" if cfg.merge else ""
    adapter = f"a PEFT adapter in {cfg.save_dtype or 'fp32'} with the base model's tokenizer files"
    return f"wrote {cfg.out}: {adapter}{merged}"


def result_chat_template(cfg: TrainConfig, tokenizer) -> str | None:
    """The chat template the result carries: the one named by --template, else the base's own. A preset
    starts from random weights and knows no template unless it was trained on conversations: its result
    trained on text or text2text data (the demo) carries none, so chat.py talks to it in completion mode."""
    if cfg.template is not None:
        return resolve_template(tokenizer, cfg.template)[1]
    preset = cfg.model in PRESETS and not os.path.isdir(cfg.model)
    if preset and read_dataset(cfg.data, quiet=True).type != "conversation":
        return None
    return tokenizer.chat_template


def summary(rows: list[dict]) -> dict:
    """The last metrics row, plus the first and last held-out loss."""
    final = dict(rows[-1]) if rows else {}
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    if evals:
        final["first_eval_loss"], final["eval_loss"] = evals[0], evals[-1]
    return final
