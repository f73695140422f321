"""The training loop behind train.py: full fine-tuning, LISA or LoRA, on one process or many, with exact resume.

One optimizer step, in order (the loop in `run` has one comment per stage):
  1. LISA: every `interval` steps sample new active blocks (nanolisa/lisa.py); frozen blocks lose their
     gradients and optimizer state at once, so memory stays flat. Under DDP the wrapper is rebuilt over
     the blocks that train now (nanolisa/parallel.py).
  2. Set the learning rate from the schedule (linear warmup, then cosine / linear decay to min_lr, or constant).
  3. Forward and backward over `grad_accum` micro-batches. The loss is the mean over every loss-bearing
     token of the whole step on every rank (the token count is all-reduced; not a mean of per-batch or
     per-rank means), so accumulation and more ranks equal one big batch.
  4. Bring the step's loss, gradient norm and SIGTERM flag to the host in one sync; stop on a non-finite
     loss, before it reaches the weights.
  5. Clip the global gradient norm, AdamW step (nanolisa/adamw.py), drop the gradients.
  6. Log; now and then evaluate on held-out data and write a resume checkpoint (nanolisa/resume.py).
The finished run writes a Hugging Face model directory (or a PEFT adapter) to --out.

Host syncs (the host waiting for the GPU) on the hot path, and why each that is left stays:
  * once per step, `step_numbers`: the loss decides whether the update may happen, and is printed;
  * once per micro-batch, in the fused loss (kernels/linear_cross_entropy.py): `nonzero` finds the
    loss-bearing tokens, a count only the data knows, so that prompt and padding tokens skip the head's
    matmuls; and its backward checks that every token's loss has the same weight, which tells it the
    gradients it computed in forward can simply be scaled. Both come at the head, when the host has
    nothing else to queue until that answer is in.
Batches are copied to the GPU from pinned memory without waiting, token counts are taken from the labels
while they are still on the host, AdamW's step counters live on the host (as torch's do), and the
non-finite check of the weights runs only before a checkpoint is written.

Several processes (`torchrun`): the same loop runs on every rank, each on its slice of every global batch
(nanolisa/data.py), with the model sharded by FSDP2 or replicated by DDP (nanolisa/parallel.py). Rank 0
alone prints progress and writes metrics, the plot and the final model; checkpoints are written by all
ranks together. SIGTERM (how schedulers pre-empt a job) and Ctrl-C finish the current step on every rank,
write a checkpoint and exit, so --resume continues bit-exactly (nanolisa/signals.py: how a run stops).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from signal import SIGTERM

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from nanolisa.activation_memory import lean
from nanolisa.adamw import AdamW
from nanolisa.config import DTYPES, to_dtype
from nanolisa.data import Batches, rank_share, read_dataset, tokenize_dataset
from nanolisa.errors import UserError
from nanolisa.evaluate import nll, write_training_args
from nanolisa.files import wait_for_removals, write_failure
from nanolisa.kernels import use_kernels
from nanolisa.kernels.compile import compile_adamw, compile_blocks
from nanolisa.lisa import LISA
from nanolisa.lora import apply_lora, mark_only_lora_trainable, merge_lora, save_adapter
from nanolisa.loss import count_loss_tokens, next_token_nll
from nanolisa.parallel import (World, all_sum, barrier, broadcast, check_same_on_all_ranks, close_world, gather,
                               grad_norm, init_world, launched_world, replicate, reshard)
from nanolisa.plot import plot_run
from nanolisa.presets import PRESETS
from nanolisa.pretrained import load_pretrained, save_pretrained, stored_dtype
from nanolisa.progress import MetricsLog, Progress
from nanolisa.resume import CHECKPOINTS, remove_checkpoints, resume, resume_candidates, save_checkpoint
from nanolisa.run_dir import RunDir
from nanolisa.runtime import autocast, default_dtype, set_threads
from nanolisa.sharded_load import load_sharded
from nanolisa.signals import (Preempted, StopSignals, is_lost_rank, launched_by_torchrun, lost_rank,  # noqa: F401
                              watch_launcher, whereabouts)
from nanolisa.templates import resolve_template, unknown_markers_note
from nanolisa.train_config import TrainConfig


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
        raise UserError(f"--parallel {cfg.parallel} needs several processes: start train.py with torchrun "
                        f"--nproc_per_node N (N > 1), or drop --parallel")
    check_inputs_exist(cfg)  # on every rank, before any rank waits for another
    if not cfg.quiet and world.is_main:
        for note in cfg.notes():
            print(f"note: {note}", file=sys.stderr)
    run_dir = RunDir(cfg) if world.is_main else None
    finished, stop, ranks = False, None, []
    try:
        stop = StopSignals(launched_by_torchrun())  # SIGTERM (held back by train.py until now) and Ctrl-C
        watch_launcher(world.rank)
        world, device = init_world(cfg.device)
        ranks = gather(whereabouts(), world)  # so that a rank that dies can be named
        if open_run_dir(run_dir, world):
            finished = True  # --resume on a finished run (a requeued job): nothing to do
            return {}
        final = run(cfg, world, device, stop)
        finished = True
        return final
    except BaseException as e:  # a gloo/NCCL error (perhaps in DCP's CheckpointException, a BaseException)
        if world.distributed and ranks and not isinstance(e, (UserError, KeyboardInterrupt, SystemExit)) and \
                is_lost_rank(e):  # another rank is gone
            raise lost_rank(world.rank, ranks) from None
        raise
    finally:
        if stop:
            stop.restore()
        if run_dir:
            run_dir.close(finished)
        close_world(clean=finished)  # (no rank waits for rank 0's removals below)
        wait_for_removals()  # the checkpoints a finished run removes are gone when it returns


def check_inputs_exist(cfg: TrainConfig) -> None:
    """A missing --model, --data or --eval-data is one line before anything starts."""
    if not os.path.isdir(cfg.model) and cfg.model not in PRESETS:
        raise UserError(f"--model {cfg.model}: no such model directory (or preset: {', '.join(PRESETS)})")
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path is not None and not path.startswith("demo") and not os.path.exists(path):
            raise UserError(f"{flag} {path}: no such file or directory")


def open_run_dir(run_dir: RunDir | None, world: World) -> bool:
    """Rank 0 checks, creates and locks --out and --log before any model or data is loaded; when it refuses
    them, every rank says so in the same one line (they wait for rank 0 here, not in a rendezvous that
    would never end). Returns whether --resume found the run finished already."""
    problem = None
    if run_dir:
        try:
            run_dir.open()
        except UserError as e:
            problem = str(e)
    problem, done = broadcast((problem, run_dir.finished_already if run_dir else None), world)
    if problem:
        raise UserError(problem)
    return bool(done)


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


def run(cfg: TrainConfig, world: World, device: torch.device, stop: StopSignals) -> dict:
    """Set up, then train from the start or from the newest intact checkpoint (--resume)."""
    set_threads(cfg.threads)
    say_what_runs(cfg, world, device)
    candidates = resume_candidates(cfg, world)  # refuses other settings before the model is loaded
    r = setup(cfg, world, device)
    check_step_fits(r)
    resume_from, start, rows = resume(r, candidates) if candidates else (None, 0, [])
    return loop(r, start, resume_from, rows, stop)


def check_step_fits(r: Run) -> None:
    """One optimizer step holds its --grad-accum micro-batches at once (their token count scales the loss):
    more than an epoch has would only repeat the data inside one step, at any memory cost."""
    if r.cfg.grad_accum > len(r.batches):
        raise UserError(f"--grad-accum {r.cfg.grad_accum}: one optimizer step would take more micro-batches than "
                        f"one epoch has ({len(r.batches)} of --batch-size {r.cfg.batch_size} per process); lower "
                        f"--grad-accum or --batch-size")


def say_what_runs(cfg: TrainConfig, world: World, device: torch.device) -> None:
    """Under torchrun, one line on rank 0: how many processes, FSDP2 or DDP, the backend, each rank's device."""
    if not world.distributed:
        return
    where = gather((socket.gethostname(), str(device)), world)
    one_host = len({host for host, _ in where}) == 1
    devices = ", ".join(f"rank {r} {dev if one_host else f'{host}:{dev}'}" for r, (host, dev) in enumerate(where))
    if world.is_main and not cfg.quiet:
        print(f"torchrun: {world.world_size} processes, {'FSDP2' if cfg.parallel == 'fsdp' else 'DDP'} on "
              f"{dist.get_backend()}; {devices}", file=sys.stderr)


def setup(cfg: TrainConfig, world: World, device: torch.device) -> Run:
    """The model, which parameters train, how the ranks share it, the data and the optimizer."""
    amp_dtype = DTYPES[cfg.dtype or default_dtype(device)]
    # FSDP2 runs bf16 through its own mixed-precision policy (fp32 master weights, bf16 compute, fp32
    # gradient reduction); one process and DDP use autocast.
    mp_dtype = amp_dtype if cfg.parallel == "fsdp" and amp_dtype != torch.float32 else None
    amp = nullcontext() if mp_dtype else autocast(device, amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 and not mp_dtype else None
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    def prepare(model) -> LISA | None:  # the model as this run trains it; returns LISA's sampler
        use_kernels(model, cfg.kernels, amp_dtype, device)  # flash attention, RMSNorm, the fused loss
        model.gradient_checkpointing = cfg.grad_checkpointing
        lean(model, cfg.checkpoint_frozen)  # save less for backward, bit-identically (activation_memory.py)
        if cfg.compile:
            compile_blocks(model)  # after checkpointing, before FSDP2 shards the blocks (kernels/compile.py)
        return setup_method(model, cfg)  # which parameters train (LoRA adds its adapters)

    # The model in fp32 master weights (mixed precision computes in bf16/fp16 when asked). FSDP2: built on
    # the meta device, prepared, sharded, then each rank reads only its rows of the checkpoint. One process
    # and DDP: loaded whole, then prepared.
    if cfg.parallel == "fsdp":
        model, tokenizer, lisa = load_sharded(cfg.model, device, world, prepare, mp_dtype, cfg.seed)
    else:
        model, tokenizer = load_pretrained(cfg.model, dtype=torch.float32, device=device)
        lisa = prepare(model)
    torch.manual_seed(cfg.seed + world.rank)  # initialisation is the same on every rank, dropout is not
    model.train()
    batches, eval_examples = load_data(cfg, tokenizer, world, model.config.vocab_size)
    total = cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(batches) / cfg.grad_accum))
    optimizer = AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.compile:
        compile_adamw(optimizer)  # each tensor's step one fused pass over memory (kernels/compile.py)
    return Run(cfg, world, device, model, tokenizer, optimizer, lisa, batches, eval_examples, total, amp, scaler)


def loop(r: Run, start: int, last_checkpoint: str | None, rows: list[dict], stop: StopSignals) -> dict:
    """The training loop, one comment per stage; then the result is written. `rows`: the metrics up to
    `start`, from the checkpoint resumed."""
    cfg, world, lisa, total = r.cfg, r.world, r.lisa, r.total
    eval_every = every(cfg.eval_every, total) if r.eval_examples is not None else 0
    save_every = every(cfg.save_every, total)
    # While the run lasts its metrics live beside its checkpoints, so a run that fails leaves an earlier
    # run's files in --out untouched; the finished run moves them to --out/metrics.jsonl.
    log = MetricsLog(cfg.log or os.path.join(cfg.out, CHECKPOINTS, "metrics.jsonl"), rows) if world.is_main else None
    progress = Progress(total, start, cfg.quiet or not world.is_main)
    data, clock = iter(r.batches), time.perf_counter()
    stop.phase = "train"  # from now on SIGTERM and Ctrl-C finish the step and checkpoint
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
        loss = forward_backward(r, micro)
        # 4. The step's numbers on the host, in the one host sync of the step: the loss (summed over the
        #    ranks), whether any rank was asked to stop (so every rank stops after the same step), the
        #    global gradient norm. A non-finite loss stops the run before it reaches the weights.
        norm = step_grad_norm(r) if cfg.clip > 0 else None
        loss, stopping, norm_value = step_numbers(loss, stop.requested is not None, norm, world, r.device)
        if not math.isfinite(loss):
            progress.close()
            raise UserError(f"loss became {loss} at step {step + 1}; stopped ({kept(last_checkpoint)}). "
                            f"Try a lower --lr or --dtype fp32/bf16")
        # 5. Clip, update, drop the gradients.
        update(r, norm)
        # 6. Log, evaluate, checkpoint.
        done, now = step + 1, time.perf_counter()
        tokens_per_s = world.world_size * sum(b["input_ids"].numel() for b in micro) / max(now - clock, 1e-9)
        clock = now
        row = {"step": done, "loss": round(loss, 6), "lr": lr, **({"grad_norm": round(norm_value, 6)} if cfg.clip else {}),
               "tokens_per_s": round(tokens_per_s, 1), **({"active": list(lisa.active)} if lisa else {})}
        if log:
            log.write(row)
        progress.update(done, {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:.0f}",
                               **({"active": lisa.active} if lisa else {})})
        if eval_every and (done % eval_every == 0 or done == total):
            evaluate(r, done, log, progress)
        if done < total and (stopping or save_every and done % save_every == 0):
            check_finite_weights(r.model, world, r.device, done, last_checkpoint)
            last_checkpoint = save_checkpoint(r, done, log.rows if log else None)
            if stopping:
                progress.close()
                raise Preempted(f"stopped by {stop.name()} after step {done}; {last_checkpoint} holds the run: "
                                f"continue it with the same command plus --resume", stop.requested or SIGTERM)
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
        return LISA(model, cfg.lisa_layers, cfg.interval, seed=cfg.seed, train_embeddings=not cfg.freeze_embeddings,
                    train_head=not cfg.freeze_head, sampling=cfg.lisa_sampling, probs=cfg.lisa_probs)
    if cfg.method == "lora":
        targets = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
        apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                   rslora=cfg.rslora, dora=cfg.dora)
        mark_only_lora_trainable(model, modules_to_save=cfg.lora_modules_to_save)
    return None


def load_data(cfg: TrainConfig, tokenizer, world: World, vocab_size: int) -> tuple[Batches, list | None]:
    """This rank's training batches, and the held-out examples (None without held-out data). Rank 0 says
    how many records were read, kept, truncated and dropped, and why (unless --quiet). Every token id must
    be below the model's vocab_size (every rank checks: each says so in one line)."""
    tok_args = dict(seq_len=cfg.seq_len, template=cfg.template, train_on_prompt=cfg.train_on_prompt,
                    vocab_size=vocab_size)
    quiet = cfg.quiet or not world.is_main
    markers = unknown_markers_note(tokenizer, cfg.template)  # --template llama3 on a tokenizer without <|eot_id|>
    if markers and not quiet:
        print(f"note: {markers}", file=sys.stderr)
    train_data = tokenize_dataset(read_dataset(cfg.data, quiet=quiet), tokenizer, **tok_args)
    if not quiet:
        print(f"note: {train_data.summary()}", file=sys.stderr)
    tokenizer.check_fits(vocab_size, ("pad_token",))  # rows are padded with it
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


def forward_backward(r: Run, micro: list[dict]) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step over this rank's micro-batches; returns this rank's
    share of the step's loss, on the device (the shares of all ranks add up to the mean NLL over every
    loss-bearing token).

    DDP and FSDP2 average gradients over the ranks; the loss is scaled by world_size so that the result is
    the gradient of the global sum over the global token count. DDP skips its all-reduce on all but the
    last micro-batch (no_sync): the gradients are summed locally first."""
    n_tokens = torch.tensor(float(sum(count_loss_tokens(b["labels"]) for b in micro)), device=r.device)
    if r.world.distributed:
        dist.all_reduce(n_tokens)  # the global count stays on the device: no host sync
    scale = r.world.world_size / n_tokens.clamp(min=1)
    module = r.ddp or r.model
    total = torch.zeros((), device=r.device)
    for i, b in enumerate(micro):
        ids, labels, position_ids = (to_device(b[k], r.device) for k in ("input_ids", "labels", "position_ids"))
        sync = r.ddp.no_sync() if r.ddp is not None and i < len(micro) - 1 else nullcontext()
        with sync:
            with r.amp:
                loss = next_token_nll(module, ids, labels, position_ids).sum() * scale
            (r.scaler.scale(loss) if r.scaler else loss).backward()
        total += loss.detach()
    return total / r.world.world_size


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A batch tensor on the device, without making the host wait: on a GPU it is copied from pinned
    memory asynchronously (a plain copy from pageable memory waits for the GPU)."""
    if t is None or device.type != "cuda":
        return None if t is None else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def step_grad_norm(r: Run) -> torch.Tensor:
    """The global L2 norm of the trainable gradients (over every rank's shards), on the device; the
    gradients unscaled first under fp16 loss scaling."""
    if r.scaler:
        r.scaler.unscale_(r.optimizer)
    return grad_norm([p for p in r.model.parameters() if p.grad is not None])


def step_numbers(loss: torch.Tensor, stopping: bool, norm: torch.Tensor | None, world: World,
                 device: torch.device) -> tuple[float, bool, float]:
    """(the step's loss summed over the ranks, whether any rank was asked to stop, the gradient norm or nan):
    one all-reduce and one copy to the host for the three. This is the step's only host sync: the loop
    needs the loss to decide whether the step may reach the weights, and to print it."""
    summed = torch.stack([loss.float(), torch.tensor(float(stopping), device=device)])
    if world.distributed:
        dist.all_reduce(summed)
    nan = torch.tensor(float("nan"), device=device)
    loss_value, stop, norm_value = torch.cat([summed, (nan if norm is None else norm.float())[None]]).tolist()
    return loss_value, bool(stop), norm_value


def update(r: Run, norm: torch.Tensor | None) -> None:
    """Clip the gradients to --clip given their global norm (None: no clipping), take the AdamW step, drop
    the gradients."""
    if r.scaler and norm is None:
        r.scaler.unscale_(r.optimizer)  # as scaler.step would (step_grad_norm did when clipping)
    if r.lisa:
        r.lisa.measure()  # --lisa-sampling gradnorm: the active blocks' gradient norms (a no-op otherwise)
    if norm is not None:
        params = [p for p in r.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, r.cfg.clip, norm)
    if r.scaler:  # the gradients are unscaled by now
        r.scaler.step(r.optimizer)
        r.scaler.update()
    else:
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)


def evaluate(r: Run, step: int, log: MetricsLog | None, progress: Progress) -> None:
    """The mean loss per loss-bearing token over the held-out examples (the metric eval.py reports). Each
    rank scores its share of them (every world_size-th example) and the sums are added over the ranks."""
    mine = rank_share(r.eval_examples, r.world.rank, r.world.world_size)
    with r.amp:
        total, count = nll(r.model, mine, r.cfg.batch_size)
    reshard(r.model)  # no backward follows these forward passes
    total, count = all_sum([total, count], r.world, r.device)
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
    bad = torch.stack([~torch.isfinite(p.detach()).all() for p in local]).sum().float()  # on the device
    if world.distributed:
        dist.all_reduce(bad)
    if bad.item():
        raise UserError(f"the weights became inf/NaN by step {step}; nothing was saved from them "
                        f"({kept(last_checkpoint)}). Try a lower --lr")


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
            if cfg.merge:  # every rank merges its shard of each adapted weight; written as below
                save_pretrained(merge_lora(model), tokenizer, os.path.join(cfg.out, "merged"), dtype=dtype,
                                writer=main)
        else:
            save_pretrained(model, tokenizer, cfg.out, writer=main, dtype=dtype)
    except (OSError, SafetensorError) as e:
        raise write_failure(f"the final model to {cfg.out}", e) from None
    if main:
        if not cfg.quiet:
            print(written(cfg, dtype), file=sys.stderr)
        if not cfg.log:
            os.replace(log.path, os.path.join(cfg.out, "metrics.jsonl"))
        for d in [cfg.out] + ([os.path.join(cfg.out, "merged")] if cfg.method == "lora" and cfg.merge else []):
            write_training_args(d, dataclasses.asdict(cfg), cfg.held_out_data())  # eval.py's default data
        remove_checkpoints(cfg.out)
        if cfg.plot:
            plot_run(log.rows, r.lisa.history if r.lisa else [], len(model.blocks), r.total,
                     os.path.join(cfg.out, "loss.png"))
    barrier(r.world, after_writing=True)


def written(cfg: TrainConfig, dtype: torch.dtype) -> str:
    """What finish() wrote, in one line."""
    how = f"{str(dtype).removeprefix('torch.')} ({'--save-dtype' if cfg.save_dtype else 'the base model dtype'})"
    if cfg.method != "lora":
        return f"wrote {cfg.out}: the model in {how}, with the base model's tokenizer files"
    merged = f"; the merged model in {how} in {os.path.join(cfg.out, 'merged')}" if cfg.merge else ""
    base = os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model  # as save_adapter records it
    adapter = (f"a PEFT adapter in {cfg.save_dtype or 'fp32'} with the base model's tokenizer files, on the base "
               f"{base} (adapter_config.json's base_model_name_or_path)")
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
