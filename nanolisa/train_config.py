"""Every setting of a training run: `TrainConfig`, its defaults and its checks.

train.py's flags map one to one onto these fields. Settings left at None are filled by `with_defaults`:
from a built-in preset's recipe (nanolisa/presets.py) when the model is a preset, otherwise with the usual
values for fine-tuning a pretrained checkpoint. `validate` turns every impossible value into one line.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from nanolisa.config import DTYPES
from nanolisa.errors import UserError
from nanolisa.presets import RECIPES

METHODS = ("lisa", "lora", "full")
SCHEDULES = ("cosine", "linear", "constant")
# Settings that may change when a run is resumed; any other difference means it is not the same run.
RESUMABLE_CHANGES = {"resume", "overwrite", "save_every", "eval_every", "log", "out", "plot", "device", "threads",
                     "quiet", "save_dtype"}
PARALLEL = ("fsdp", "ddp")


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
    overwrite: bool = False
    parallel: str | None = None  # None: fsdp under torchrun with several ranks
    log: str | None = None
    plot: bool = True
    device: str | None = None
    threads: int | None = None
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
        if self.parallel is not None and self.parallel not in PARALLEL:
            raise UserError(f"unknown --parallel {self.parallel!r}: choose one of {', '.join(PARALLEL)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.save_dtype is not None and self.save_dtype not in DTYPES:
            raise UserError(f"unknown --save-dtype {self.save_dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
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
