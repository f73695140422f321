"""What a run reports while it goes: a progress display on stderr and the metrics log (metrics.jsonl).

On a terminal the display is a tqdm bar; anywhere else (CI logs, nohup, a pipe) it is a plain line every
few percent, so logs are not filled with carriage returns.
"""
from __future__ import annotations

import json
import math
import os
import sys

from tqdm import tqdm


class Progress:
    """tqdm on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, start: int, quiet: bool, desc: str = "train"):
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.every = max(1, total // 20)
        if self.tty:
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)

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


class MetricsLog:
    """metrics.jsonl: one JSON object per line ({"step", "loss", "lr", ...} or {"step", "eval_loss"}).

    Always valid JSON: a number that is not finite is written as null (Python's json would write NaN, which
    no JSON reader takes). A resumed run starts from the rows its checkpoint holds (nanolisa/resume.py),
    then writes the rest."""

    def __init__(self, path: str, rows: list[dict] | None = None):
        self.path = path
        self.rows = list(rows or [])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "w")
        for row in self.rows:
            self.file.write(to_json(row) + "\n")
        self.file.flush()

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self.file.write(to_json(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def to_json(row: dict) -> str:
    """One metrics row as strict JSON: inf and NaN become null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(clean, allow_nan=False)
