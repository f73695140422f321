"""The output directory of a run (--out): what may be written there, one run at a time.

The rules, checked before any model or data is loaded:
  * --out is never the --model directory: a run never overwrites its base model.
  * A fresh run needs --out to be new or empty. A non-empty one (a finished run, or anybody's files) is
    refused unless --overwrite is given, and then only what nanolisa writes is replaced (the model and
    tokenizer files, metrics.jsonl, loss.png, merged/); any other file stays.
  * A run that did not finish left resume checkpoints in --out/checkpoints/: it continues with --resume,
    and a fresh run there is refused. --resume where nothing is left to resume is refused too, except in a
    new or empty --out (a scheduler that always passes --resume starts the run the first time).
  * One run per --out: the run holds an exclusive lock on --out/.nanolisa.lock for its whole life. The
    operating system drops the lock when the process dies, so a killed run never blocks its own resume.
  * Temporary directories a killed run left behind (--out/.tmp-*, --out/checkpoints/.tmp-*) are removed.
  * An --out that cannot be created or written is one line, not a traceback.
"""
from __future__ import annotations

import errno
import fcntl
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
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(self.lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.lock_fd)
            self.lock_fd = None
            raise UserError(f"--out {out} is in use by another run (pid {holder}); wait for it to finish, "
                            f"or choose another --out") from None
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, str(os.getpid()).encode(), 0)
        self._remove_leftovers()
        self._check_contents()
        if cfg.log:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(cfg.log)), exist_ok=True)
                open(cfg.log, "a").close()
            except OSError as e:
                raise UserError(f"--log {cfg.log}: cannot write it ({e.strerror})") from None

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
        if cfg.resume:
            raise UserError(f"--resume: {out} holds {what} and no checkpoint to resume from; pass --overwrite "
                            f"(without --resume) to train into it again, or choose another --out")
        if not cfg.overwrite:
            raise UserError(f"--out {out} is not empty: it holds {what}. Pass --overwrite to replace what "
                            f"nanolisa writes there (other files are kept), or choose another --out")

    def close(self, finished: bool) -> None:
        """Release the lock; a run that failed before writing anything leaves no --out behind."""
        if self.lock_fd is None:
            return
        os.remove(os.path.join(self.out, LOCK))  # while still holding it
        os.close(self.lock_fd)
        self.lock_fd = None
        if not finished and self.created and os.path.isdir(self.out) and not _entries(self.out):
            shutil.rmtree(self.out, ignore_errors=True)
