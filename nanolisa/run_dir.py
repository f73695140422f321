"""The output directory of a run (--out): what may be written there, one run at a time.

The rules, checked before any model or data is loaded:
  * --out is never the --model directory: a run never overwrites its base model.
  * A fresh run needs --out to be new or empty. A non-empty one (a finished run, or anybody's files) is
    refused unless --overwrite is given, and then only what nanolisa writes is replaced (the model and
    tokenizer files, metrics.jsonl, loss.png, merged/); any other file stays.
  * A run that did not finish left resume checkpoints in --out/checkpoints/: it continues with --resume,
    and a fresh run there is refused. --resume in a new or empty --out starts the run (a scheduler that
    always passes --resume starts it the first time), and --resume on a finished run does nothing and
    succeeds (a pre-empted job requeued after its final save). --resume in an --out holding other files
    is refused.
  * One run per --out: the run holds an exclusive lock on --out/.nanolisa.lock for its whole life. The
    operating system drops the lock when the process dies, so a killed run never blocks its own resume.
  * --log (the metrics, elsewhere than --out) follows the same rules: never inside the base model, never
    the data, never inside --out but as --out/metrics.jsonl, never an existing file that is not a metrics
    log, and an existing metrics log only with --overwrite or when resuming. The run locks it too, so
    two runs never write one log.
  * Temporary directories a killed run left behind (--out/.tmp-*, --out/checkpoints/.tmp-*) are removed.
  * An --out that cannot be created or written is one line, not a traceback.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys

from nanolisa.errors import UserError
from nanolisa.resume import CHECKPOINTS, checkpoint_dirs
from nanolisa.train_config import TrainConfig

LOCK = ".nanolisa.lock"


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _entries(out: str) -> list[str]:
    """What --out holds apart from the lock and temporary leftovers."""
    return [n for n in os.listdir(out) if n != LOCK and not n.startswith(".tmp-")]


class RunDir:
    """--out for the length of one run: opened (checked, created, locked) first, closed last."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = cfg.out
        self.created = False
        self.lock_fd: int | None = None
        self.log_fd: int | None = None
        self.log_created = False
        self.finished_already = False  # --resume on a finished run: nothing to do

    def open(self) -> None:
        cfg, out = self.cfg, self.out
        for target in (out, os.path.join(out, "merged")):
            if os.path.isdir(cfg.model) and _same_dir(target, cfg.model):
                raise UserError(f"--out {out} would write into the base model directory {cfg.model}; "
                                f"choose another --out")
        self.created = not os.path.exists(out)
        try:
            os.makedirs(out, exist_ok=True)
            self.lock_fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create or write it ({e.strerror})") from None
        if not try_lock(self.lock_fd):
            holder = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.lock_fd)
            self.lock_fd = None
            raise UserError(f"--out {out} is in use by another run (pid {holder}); wait for it to finish, "
                            f"or choose another --out")
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, str(os.getpid()).encode(), 0)
        self._remove_leftovers()
        self._check_contents()
        if cfg.log:
            self._open_log()

    def _remove_leftovers(self) -> None:
        for parent in (self.out, os.path.join(self.out, CHECKPOINTS)):
            if os.path.isdir(parent):
                for name in os.listdir(parent):
                    if name.startswith(".tmp-"):
                        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)

    def _check_contents(self) -> None:
        cfg, out = self.cfg, self.out
        if checkpoint_dirs(out):
            return  # an unfinished run: resume.find_resume_checkpoint decides (it needs --resume)
        others = [n for n in _entries(out) if n != CHECKPOINTS]  # checkpoints/ without a checkpoint: a failed run
        if not others:
            if cfg.resume:
                print(f"note: nothing to resume in {out}; starting a new run", file=sys.stderr)
            return
        finished = any(n in others for n in ("config.json", "adapter_config.json"))
        what = "a finished run" if finished else f"files of its own ({', '.join(sorted(others)[:3])}...)"
        if cfg.resume and finished:
            print(f"note: --resume: {out} holds a finished run and no checkpoint; nothing to resume, nothing "
                  f"was trained (pass --overwrite without --resume to train into it again)", file=sys.stderr)
            self.finished_already = True
            return
        if cfg.resume:
            raise UserError(f"--resume: {out} holds {what} and no checkpoint to resume from; pass --overwrite "
                            f"(without --resume) to train into it again, or choose another --out")
        if not cfg.overwrite:
            raise UserError(f"--out {out} is not empty: it holds {what}. Pass --overwrite to replace what "
                            f"nanolisa writes there (other files are kept), or choose another --out")

    def _open_log(self) -> None:
        """Check --log against the rules above, then create and lock it."""
        cfg, log = self.cfg, self.cfg.log
        real = os.path.realpath(log)
        inside = lambda d: os.path.commonpath([real, os.path.realpath(d)]) == os.path.realpath(d)  # noqa: E731
        if os.path.isdir(cfg.model) and inside(cfg.model):
            raise UserError(f"--log {log} is inside the base model directory {cfg.model}; choose another --log")
        for flag, data in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
            if data and os.path.exists(data) and inside(data):
                raise UserError(f"--log {log} would overwrite the {flag} {data}; choose another --log")
        if inside(self.out) and real != os.path.realpath(os.path.join(self.out, "metrics.jsonl")):
            raise UserError(f"--log {log} is inside --out {self.out}, where the run writes its own files; use "
                            f"{os.path.join(self.out, 'metrics.jsonl')} or a path outside --out")
        if os.path.isdir(log) or (os.path.exists(log) and not os.path.isfile(log)):
            raise UserError(f"--log {log} is not a regular file; give the path of a .jsonl file")
        if os.path.exists(log) and os.path.getsize(log) > 0:
            if not _is_metrics_log(log):
                raise UserError(f"--log {log} exists and is not a metrics log; nanolisa never replaces it "
                                f"(not even with --overwrite): choose another --log")
            if not cfg.overwrite and not (cfg.resume and checkpoint_dirs(self.out)):
                raise UserError(f"--log {log} holds another run's metrics; pass --overwrite to replace them, "
                                f"or choose another --log")
        self.log_created = not os.path.exists(log)
        try:
            os.makedirs(os.path.dirname(real), exist_ok=True)
            self.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        except OSError as e:
            raise UserError(f"--log {log}: cannot write it ({e.strerror})") from None
        if not try_lock(self.log_fd):
            raise UserError(f"--log {log} is in use by another run; choose another --log")

    def close(self, finished: bool) -> None:
        """Release the locks; a run that failed before writing anything leaves no --out (nor --log) behind."""
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
            if not finished and self.log_created and os.path.isfile(self.cfg.log) and \
                    os.path.getsize(self.cfg.log) == 0:
                os.remove(self.cfg.log)
        if self.lock_fd is None:
            return
        os.remove(os.path.join(self.out, LOCK))  # while still holding it
        os.close(self.lock_fd)
        self.lock_fd = None
        if not finished and self.created and os.path.isdir(self.out) and not _entries(self.out):
            shutil.rmtree(self.out, ignore_errors=True)


def _is_metrics_log(path: str) -> bool:
    """Whether a file reads as a metrics log: its first line is a JSON object with a "step" (only the first
    64 KiB are read: whatever else the file is, it is not read whole)."""
    try:
        with open(path, "rb") as f:
            first = f.read(1 << 16).split(b"\n", 1)[0]
        row = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and "step" in row


def try_lock(fd: int) -> bool:
    """Take an exclusive lock on fd without waiting; False if another process holds it. The kernel drops
    the lock when the process ends, however it ends: a killed run never leaves a stale lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
