"""Fine-tune a language model with LISA (default), LoRA or full fine-tuning.

Usage (`nanolisa train ...` runs the same code as `python train.py ...`):
  python train.py                                     # LISA on the built-in tiny model and demo data (CPU, ~3 min)
  python train.py --model path/to/llama --data alpaca.json --lisa-layers 2 --interval 20 --steps 1000
  python train.py --method lora --lora-r 8 --lora-alpha 16 --merge --model path/to/llama --data chats.jsonl
  python train.py --resume --out out                  # continue an interrupted run, bit-for-bit
  torchrun --standalone --nproc_per_node 4 train.py --model path/to/llama --data chats.jsonl   # 4 GPUs, FSDP2

The final model is written to --out as a Hugging Face directory with the base's tokenizer files and in the
base's dtype (what loads the base loads it: transformers, vLLM, llama.cpp's converter for the bases it
supports), or as a PEFT adapter for --method lora; resumable checkpoints go to
--out/checkpoints/, the per-step metrics to --out/metrics.jsonl and a loss plot to --out/loss.png.
LMFlow's flag spellings --lisa_activated_layers and --lisa_interval_steps are accepted too.
"""
from __future__ import annotations

import argparse
import sys

from nanolisa.cli.common import ArgumentParser, add_runtime_args, run_cli
from nanolisa.errors import UserError
from nanolisa.lisa import SAMPLING
from nanolisa.presets import RECIPES
from nanolisa.progress import to_json
from nanolisa.runtime import return_freed_memory_to_os
from nanolisa.templates import PRESETS
from nanolisa.train_config import TrainConfig
from nanolisa.trainer import Preempted, train

TINY = RECIPES["tiny"]


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return parse(argv)[0]


def parse(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """The run's settings, and every flag as given (--dry-run's among them)."""
    d = TrainConfig()
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(p, d)
    add_method_args(p, d)
    add_optimisation_args(p, d)
    add_runtime_args(p.add_argument_group("runtime"), training=True)
    add_output_args(p, d)
    add_plan_args(p)
    a = p.parse_args(argv)

    cfg = TrainConfig(**{k: v for k, v in vars(a).items() if k in TrainConfig.__dataclass_fields__})
    cfg.plot = not a.no_plot
    cfg.lora_modules_to_save = [m for m in a.lora_modules_to_save.split(",") if m]
    return cfg, a


def add_data_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """--model, --data, --out and how the data becomes examples."""
    g = p.add_argument_group("model, data and output")
    g.add_argument("--model", default=d.model, help="Hugging Face model directory, or a built-in preset "
                   "(default: %(default)s, a 0.8M-parameter Llama that needs no download)")
    g.add_argument("--data", default=d.data, help="training data: a file or directory in any supported format "
                   "(LMFlow JSON, Alpaca, ShareGPT, OpenAI messages jsonl, plain .txt), or the bundled "
                   "string-task demo set: 'demo' (text2text) or 'demo:conversation' (chats), whose held-out "
                   "splits are 'demo:test' and 'demo:conversation:test' (default: %(default)s)")
    g.add_argument("--eval-data", default=None, help="held-out data for --eval-every (default: the demo test "
                   "split when --data is demo, otherwise none)")
    g.add_argument("--out", default=d.out, help="output directory: the final model, checkpoints/, "
                   "metrics.jsonl and loss.png (default: %(default)s)")
    g.add_argument("--save-dtype", default=None, choices=["fp32", "bf16", "fp16"], help="dtype of the weights "
                   "written to --out (default: the base checkpoint's own, as its config.json says; a LoRA "
                   "adapter is fp32, as peft keeps adapters)")
    g.add_argument("--template", default=None, help="chat template for conversation data: a preset name "
                   f"({', '.join(PRESETS)}), a .jinja file or Jinja string, or, by default, the model's own; "
                   "the result in --out carries it")
    g.add_argument("--train-on-prompt", action="store_true", help="take loss on prompts and user turns too "
                   "(default: only on outputs / assistant turns)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="longer examples are truncated "
                   "(and counted) (default: %(default)s)")
    g.add_argument("--pack", action="store_true", help="pack several examples into each row of --seq-len "
                   "tokens; attention never crosses examples, and the same tokens take a loss as unpacked")


def add_method_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """LISA, LoRA or full fine-tuning, and each method's settings."""
    g = p.add_argument_group("method", "the LISA flags are for --method lisa and the LoRA flags for --method "
                             "lora: given with another method they are an error, since they would do nothing")
    g.add_argument("--method", default=d.method, help="lisa | lora | full (default: %(default)s)")
    g.add_argument("--lisa-layers", "--lisa_activated_layers", type=int, default=d.lisa_layers,
                   help="LISA: number of transformer blocks trained at a time, gamma (default: %(default)s)")
    g.add_argument("--interval", "--lisa_interval_steps", type=int, default=d.interval,
                   help="LISA: optimizer steps between re-sampling the active blocks, K (default: 20; the tiny "
                   f"preset's recipe: {TINY['interval']})")
    g.add_argument("--lisa-sampling", default=d.lisa_sampling, choices=list(SAMPLING), help="LISA: how the "
                   "active blocks are drawn at each switch: uniform (the paper's), weighted (fixed "
                   "--lisa-probs), gradnorm (in proportion to a running estimate of each block's gradient "
                   "norm, measured while it is active; a quarter of the probability stays uniform so every "
                   "block keeps being visited) (default: %(default)s)")
    g.add_argument("--lisa-probs", type=probabilities, default=None, help="LISA with --lisa-sampling weighted: "
                   "one weight per transformer block, comma-separated (e.g. 1,1,2,4), normalised to sum to 1")
    g.add_argument("--freeze-embeddings", action="store_true", help="LISA: do not train the token embedding "
                   "(with large vocabularies it dominates LISA's memory)")
    g.add_argument("--freeze-head", action="store_true", help="LISA: do not train the final norm and LM head")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha; the adapter is "
                   "scaled by alpha/r (default: %(default)s)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input "
                   "(default: %(default)s)")
    g.add_argument("--lora-targets", default=d.lora_targets, help="comma-separated module names to adapt "
                   "(q_proj,v_proj,... or GPT-2's c_attn,c_proj,c_fc), or all-linear (default: %(default)s)")
    g.add_argument("--lora-modules-to-save", default="", help="comma-separated modules trained in full "
                   "beside the adapters, e.g. embed_tokens,lm_head")
    g.add_argument("--rslora", action="store_true", help="scale adapters by alpha/sqrt(r) (rsLoRA)")
    g.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (DoRA)")
    g.add_argument("--merge", action="store_true", help="LoRA: also write the merged full model to --out/merged")


def probabilities(text: str) -> list[float]:
    """--lisa-probs: comma-separated numbers."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def add_optimisation_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Steps, batches, the learning-rate schedule and AdamW."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps to run (default: one epoch, or "
                   f"--epochs; the tiny preset's recipe: {TINY['steps']})")
    g.add_argument("--epochs", type=float, default=None, help="epochs to run, instead of --steps (with a preset, "
                   "instead of its recipe's steps too)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per micro-batch per device "
                   f"(default: 4; the tiny preset's recipe: {TINY['batch_size']})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step "
                   "(default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: 5e-5, "
                   f"2e-4 for LoRA; the tiny preset starts from random weights and its recipe uses {TINY['lr']:g})")
    g.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine or "
                   "linear decay (default: %(default)s)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps (default: 0; the "
                   f"tiny preset's recipe: {TINY['warmup']})")
    g.add_argument("--schedule", default=d.schedule, help="cosine | linear | constant (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay, "
                   "not applied to biases and norms (default: %(default)s)")
    g.add_argument("--clip", type=float, default=d.clip, help="clip the gradient norm to this; 0 disables "
                   "(default: %(default)s)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward "
                   "pass: less memory, about a third more compute")
    g.add_argument("--checkpoint-frozen", action="store_true", help="recompute in backward only the activations "
                   "of blocks with nothing to train (LISA's frozen blocks): each keeps just its input, at the cost "
                   "of one more forward of it, which takes away most of LISA's speed-up over full fine-tuning")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block and AdamW's "
                   "step (inductor; on a CPU it needs a C compiler): the first steps pay the compilation, LISA's "
                   "switches cost a bounded number of recompilations (one per block kind and trainable state); "
                   "results match the eager run within float rounding, not bit for bit")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the initialisation, data order and LISA's "
                   "layer sampling (default: %(default)s)")


def add_output_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Evaluation, checkpoints, resuming, logs, and several processes."""
    g = p.add_argument_group("evaluation, checkpoints and logs")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out loss every N steps, 0 = "
                   "never, -1 = ten times per run (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="write a resumable checkpoint every "
                   "N steps, 0 = never, -1 = ten times per run; a finished run removes its checkpoints "
                   "(default: %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue the run whose checkpoints are in --out, "
                   "from the newest intact one (in a new or empty --out it starts the run; on a finished run it "
                   "does nothing and succeeds)")
    g.add_argument("--overwrite", action="store_true", help="train into a non-empty --out (a finished run, "
                   "other files): the files nanolisa writes are replaced, any others kept; likewise an earlier "
                   "run's metrics at --log")
    g.add_argument("--parallel", default=None, help="under torchrun with several processes: fsdp (shard "
                   "weights, gradients and AdamW state across the ranks) or ddp (replicate the model) "
                   "(default: fsdp)")
    g.add_argument("--log", default=None, help="metrics jsonl path (default: "
                   "--out/checkpoints/metrics.jsonl while the run lasts, --out/metrics.jsonl once it finishes). "
                   "Never inside the base model or --out (but --out/metrics.jsonl), never the data, never an "
                   "existing file other than a metrics log, and an earlier metrics log only with --overwrite")
    g.add_argument("--no-plot", action="store_true", help="do not draw --out/loss.png")
    g.add_argument("--quiet", action="store_true", help="no progress output and no notes (errors are "
                   "still printed)")



def add_plan_args(p: argparse.ArgumentParser) -> None:
    """--dry-run and what it plans for (nanolisa/plan.py)."""
    g = p.add_argument_group("planning (--dry-run)", "plan the memory of the run these flags describe, per "
                             "component and per rank, without loading weights or writing anything")
    g.add_argument("--dry-run", action="store_true", help="print the memory this run will need per rank "
                   "(weights, gradients, AdamW state, activations, loss, the process) and whether it fits; "
                   "reads config.json only, so it takes seconds even for a 70B model. Under torchrun it plans "
                   "for torchrun's processes")
    g.add_argument("--world-size", type=int, default=None, help="with --dry-run: plan for this many processes "
                   "(GPUs), as torchrun would start them, from one machine (default: torchrun's, else 1)")
    g.add_argument("--device-memory", default=None, help="with --dry-run: the memory of one device to plan "
                   "against, e.g. 80GB (GB = GiB = 2**30 bytes); implies a GPU unless --device cpu "
                   "(default: the GPU here, else this machine's RAM)")
    g.add_argument("--json", action="store_true", help="with --dry-run: print the plan as one JSON object "
                   "(total_bytes, components: name -> bytes, moments, verdict, ...)")


def main(argv: list[str] | None = None) -> None:
    cfg, a = parse(argv)
    if a.dry_run:
        from nanolisa.plan import dry_run
        dry_run(cfg, a.world_size, a.device_memory, a.json)
        return
    for flag in ("world_size", "device_memory", "json"):
        if getattr(a, flag) not in (None, False):
            raise UserError(f"--{flag.replace('_', '-')} only applies to --dry-run")
    return_freed_memory_to_os()
    try:
        final = train(cfg)
    except Preempted as e:
        print(f"note: {e}", file=sys.stderr)
        sys.exit(e.exit_code)  # 143 (SIGTERM) or 130 (Ctrl-C): the job did not finish, as a scheduler expects
    if final:  # rank 0
        print(to_json(final))


def run() -> None:
    run_cli(main)
