"""Every setting of a training run: `TrainConfig`, its defaults and its checks.

train.py's flags map one to one onto these fields. Settings left at None are filled by `with_defaults`:
from a built-in preset's recipe (nanolisa/presets.py) when the model is a preset, otherwise with the usual
values for fine-tuning a pretrained checkpoint. `validate` turns every impossible value, and every setting
that would do nothing in this run (a LoRA flag with --method lisa, say), into one line.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from nanolisa.config import DTYPES, read_config
from nanolisa.errors import UserError
from nanolisa.lisa import SAMPLING
from nanolisa.presets import PRESETS, RECIPES
from nanolisa.runtime import check_threads, pick_device

METHODS = ("lisa", "lora", "full")
SCHEDULES = ("cosine", "linear", "constant")
# Settings that may change when a run is resumed; any other difference means it is not the same run.
RESUMABLE_CHANGES = {"resume", "overwrite", "save_every", "eval_every", "log", "out", "plot", "device", "threads",
                     "quiet", "save_dtype", "kernels", "checkpoint_frozen", "compile"}
PARALLEL = ("fsdp", "ddp")
# Settings only one method reads: giving one to another method is a mistake, not a harmless no-op.
METHOD_ONLY = {
    "lisa": ("lisa_layers", "interval", "freeze_embeddings", "freeze_head", "lisa_sampling", "lisa_probs",
             "checkpoint_frozen"),
    "lora": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_modules_to_save", "rslora", "dora",
             "merge"),
}
FLOAT_FLAGS = ("lr", "min_lr", "clip", "weight_decay", "epochs", "lora_alpha", "lora_dropout")
MAX_SEED = 2**64 - 1  # torch.manual_seed takes 0 .. 2**64 - 1; numpy, which shuffles the data, refuses < 0
# AdamW's first step moves a weight by up to lr / (1 - beta1) = 10 lr (beta1 = 0.9), a float32 number: a larger
# --lr is not one at all (--lr 1e300 ended in a traceback inside the optimizer).
MAX_LR = 3.4028234663852886e38 * (1 - 0.9)  # torch.finfo(torch.float32).max * (1 - beta1)


@dataclass
class TrainConfig:
    """Every setting of a run; train.py's flags map one to one onto these fields."""
    model: str = "tiny"
    data: str = "demo"
    eval_data: str | None = None
    out: str = "out"
    save_dtype: str | None = None  # None: the base checkpoint's dtype (LoRA adapters: fp32, as trained)
    method: str = "lisa"
    lisa_layers: int = 1
    interval: int | None = None  # None: 20, or a preset's recipe
    freeze_embeddings: bool = False
    freeze_head: bool = False
    lisa_sampling: str = "uniform"
    lisa_probs: list[float] | None = None  # --lisa-sampling weighted: one per block
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
    checkpoint_frozen: bool = False  # recompute only blocks with nothing to train (activation_memory.py)
    compile: bool = False  # torch.compile each block (kernels/compile.py)
    seed: int = 0
    eval_every: int = -1  # -1: ten evaluations over the run
    save_every: int = -1  # -1: ten checkpoints over the run
    resume: bool = False
    overwrite: bool = False
    parallel: str | None = None  # None: fsdp under torchrun with several ranks
    log: str | None = None
    plot: bool = True
    device: str | None = None
    kernels: str = "auto"
    threads: int | None = None
    quiet: bool = False

    def with_defaults(self) -> "TrainConfig":
        """Fill the settings left at None: a built-in preset's recipe (nanolisa/presets.py), otherwise the
        usual values for fine-tuning a pretrained checkpoint."""
        recipe = {} if os.path.isdir(self.model) else dict(RECIPES.get(self.model, {}))
        if self.epochs is not None:
            recipe.pop("steps", None)  # --epochs says how long to run, not the recipe's step count
        if self.method != "lisa":
            recipe.pop("interval", None)  # only LISA reads it
        usual = {"lr": 2e-4 if self.method == "lora" else 5e-5, "warmup": 0, "batch_size": 4, "steps": None,
                 "interval": 20 if self.method == "lisa" else None}
        filled = {k: recipe.get(k, v) for k, v in usual.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **filled)

    def held_out_data(self) -> str | None:
        """Where --eval-every's held-out examples come from: --eval-data, or the demo's test split when
        training on the demo; None without held-out data."""
        return self.eval_data or (self.data + ":test" if self.data in ("demo", "demo:conversation") else None)

    def validate(self) -> None:
        """Every impossible or contradictory setting is one line here, before anything is loaded or written.
        Call it on the result of `with_defaults`."""
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r}: choose one of {', '.join(METHODS)}")
        self._check_method_flags()
        for name in FLOAT_FLAGS:  # argparse's float() takes "inf" and "nan"
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise UserError(f"{flag(name)} must be a finite number, got {v}")
        if self.lisa_layers < 0:
            raise UserError(f"--lisa-layers must be >= 0, got {self.lisa_layers}")
        if self.interval is not None and self.interval < 1:
            raise UserError(f"--interval must be >= 1, got {self.interval}")
        if self.lisa_sampling not in SAMPLING:
            raise UserError(f"unknown --lisa-sampling {self.lisa_sampling!r}: choose one of {', '.join(SAMPLING)}")
        if self.lisa_probs is not None and self.lisa_sampling != "weighted":
            raise UserError(f"--lisa-probs is for --lisa-sampling weighted, not {self.lisa_sampling}")
        if self.lisa_probs is None and self.lisa_sampling == "weighted":
            raise UserError("--lisa-sampling weighted needs --lisa-probs: one weight per transformer block")
        if self.parallel is not None and self.parallel not in PARALLEL:
            raise UserError(f"unknown --parallel {self.parallel!r}: choose one of {', '.join(PARALLEL)}")
        if self.method == "lisa" and self.lisa_layers == 0 and self.freeze_embeddings and self.freeze_head:
            raise UserError("nothing to train: --lisa-layers 0 with --freeze-embeddings and --freeze-head")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.save_dtype is not None and self.save_dtype not in DTYPES:
            raise UserError(f"unknown --save-dtype {self.save_dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise UserError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise UserError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.lr > MAX_LR:
            raise UserError(f"--lr {self.lr:g} is too large: AdamW's step lr / (1 - beta1) must be a float32 "
                            f"number, so --lr <= {MAX_LR:.3g}")
        if self.schedule == "constant" and self.min_lr != 0:
            raise UserError("--min-lr does nothing with --schedule constant: drop it, or choose cosine or linear")
        for name in ("warmup", "weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise UserError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.lora_r < 1:
            raise UserError(f"--lora-r must be >= 1, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise UserError(f"--lora-alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be in [0, 2**64 - 1], got {self.seed}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < -1:
                raise UserError(f"{flag(name)} must be N >= 1, 0 (never) or -1 (ten times per run), "
                                f"got {getattr(self, name)}")
        if self.eval_every > 0 and self.held_out_data() is None:
            raise UserError(f"--eval-every {self.eval_every} needs held-out data: pass --eval-data FILE")
        if self.threads is not None:
            check_threads(self.threads)
        pick_device(self.device)  # a bad or unavailable --device is one line now, not after --out is written
        if os.path.isdir(self.model):  # a bad config.json too, and the flags that must fit the model
            model = read_config(self.model)
            if model.is_gpt2 and self.seq_len > model.max_position_embeddings:
                raise UserError(f"--seq-len {self.seq_len} is longer than this GPT-2's context "
                                f"(n_positions {model.max_position_embeddings})")

    def context(self) -> int:
        """The model's context: max_position_embeddings of its config.json, or of the preset."""
        if os.path.isdir(self.model):
            return read_config(self.model).max_position_embeddings
        return PRESETS[self.model]["max_position_embeddings"] if self.model in PRESETS else 0

    def notes(self) -> list[str]:
        """What the user is told once before the run starts (as `note: ...`): settings that are allowed but
        may not do what they seem to."""
        notes = []
        if self.model in PRESETS and os.path.isdir(self.model):
            notes.append(f"--model {self.model} is the directory {os.path.abspath(self.model)}, not the built-in "
                         f"preset of that name (run from another directory to use the preset)")
        if self.seq_len > self.context() > 0:
            notes.append(f"--seq-len {self.seq_len} is longer than the model's context (max_position_embeddings "
                         f"{self.context()}): longer rows train positions the base model never saw (rotary "
                         f"positions extend to them)")
        return notes

    def _check_method_flags(self) -> None:
        """A setting that only another method reads does nothing in this run: refuse it rather than ignore
        it. A setting counts as given when it differs from its default (so `--lora-r 8` with LISA, the
        default value given explicitly, passes unnoticed; it would change nothing either way)."""
        default = TrainConfig()
        for method, names in METHOD_ONLY.items():
            given = [n for n in names if getattr(self, n) != getattr(default, n)]
            if given and self.method != method:
                raise UserError(f"{flag(given[0])} only applies to --method {method}, and this run is "
                                f"--method {self.method}")


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")
