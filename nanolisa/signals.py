"""How a training run stops: SIGTERM, Ctrl-C, a launcher that is gone, another rank that failed.

Schedulers pre-empt a job with SIGTERM, people press Ctrl-C; neither may lose the run (`StopSignals`):
  * While training, SIGTERM and the first Ctrl-C let the loop finish its step; then every rank writes a
    checkpoint together and the run exits, 143 for SIGTERM and 130 for Ctrl-C (128 + the signal number, as
    a shell reports a process the signal killed), with the --resume command that continues it. A second
    Ctrl-C stops at once, keeping the last checkpoint. During the final save both wait for the save.
  * While setting up (loading the model and data) nothing has been trained, so SIGTERM stops at once.
  * Until a process has checked its own inputs, a SIGTERM waits: train.py blocks it (it stays pending)
    before it imports torch, and `StopSignals` unblocks it. torchrun sends SIGTERM to every rank as soon as
    one of them fails; a rank that died of it before reaching its own check would never say what is wrong
    with its input.

Under torchrun a rank can be left alone in two more ways:
  * Its launcher is gone (killed with SIGKILL, or crashed): the ranks would train on to the end with nobody
    supervising them. `watch_launcher` starts a thread that notices the parent process change and ends
    the rank within a second. (A thread rather than Linux's parent-death signal: that signal fires when
    the launcher's *thread* that started the rank exits, and exists on Linux only.)
  * Another rank died: this rank's next collective fails with a gloo/NCCL error. `lost_rank` turns it into
    one line that names the rank that stopped (when it ran on this machine), instead of a traceback.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

from nanolisa.errors import UserError

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class Preempted(Exception):
    """SIGTERM or Ctrl-C stopped the run (after a checkpoint, when there was anything to save)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """SIGTERM and Ctrl-C for the length of a run; `phase` decides what they do (see the module docstring).
    `requested` is the signal that asked the loop to stop after its step (None: none did)."""

    def __init__(self, torchrun: bool):
        self.phase = "setup"  # then "train" (the loop and the final save)
        self.requested: int | None = None
        self.torchrun = torchrun
        self._previous: dict[int, object] = {}
        try:
            for sig in NAMES:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (train() called from a worker thread): keep the defaults
            return
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a pending SIGTERM arrives now

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and (self.phase == "setup" or self.requested is not None):
            raise KeyboardInterrupt  # Ctrl-C while setting up, or the second Ctrl-C: stop at once
        if self.phase == "setup":
            why = " (torchrun stops every rank when one of them fails: see the first error)" if self.torchrun else ""
            raise Preempted(f"stopped by SIGTERM before training started{why}; nothing new to save", signum)
        if self.requested is None:
            self.requested = signum
            if signum == signal.SIGINT:
                print("\nnote: Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to stop at "
                      "once)", file=sys.stderr, flush=True)

    def name(self) -> str:
        return NAMES.get(self.requested, "a signal")

    def restore(self) -> None:
        """Give the caller its own handlers back (train() may be called from a longer-lived program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


# ----------------------------------------------------------------------------------------------------------
# Under torchrun


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun's agent for every rank it starts


def watch_launcher(rank: int) -> None:
    """Under torchrun, end this rank within a second once its launcher (the parent process) is gone. Every
    file a run writes is written under a temporary name and renamed, so stopping anywhere loses only the
    steps since the last checkpoint."""
    global _launcher
    if not launched_by_torchrun():
        return
    parent = _launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print(f"error: {launcher_gone(rank)}", file=sys.stderr, flush=True)
        os._exit(2)  # from a thread: sys.exit would end only the thread

    threading.Thread(target=watch, name="nanolisa-launcher-watchdog", daemon=True).start()


_launcher: int | None = None  # the launcher's pid, once watch_launcher watches it


def launcher_gone(rank: int) -> str | None:
    """The line for a rank whose torchrun launcher has gone (its parent changed), else None."""
    if _launcher is None or os.getppid() == _launcher:
        return None
    return (f"rank {rank}: its torchrun launcher (pid {_launcher}) is gone, so this rank stops too; the last "
            f"checkpoint continues the run with --resume")


def whereabouts() -> tuple[str, int]:
    """(host, pid) of this process: gathered from every rank at start, so that a rank that dies can be named."""
    return socket.gethostname(), os.getpid()


def is_lost_rank(e: BaseException) -> bool:
    """Whether an exception from a collective means another rank went away (its connection closed)."""
    text = str(e)
    return type(e).__name__ in ("DistBackendError", "DistNetworkError") or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                            "Socket closed", "Connection refused"))


def _gone(pid: int) -> bool:
    """Whether a process on this machine has ended (a zombie not yet reaped by its launcher counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False


def lost_rank(rank: int, ranks: list[tuple[str, int]], wait: float = 5.0) -> UserError:
    """The one line for a collective that failed because another rank stopped: names the ranks on this
    machine whose process has ended (waiting up to `wait` seconds for it to finish exiting). When this rank's
    own launcher is gone, that is the cause (the other rank saw it first), and the line says so."""
    if launcher_gone(rank):
        time.sleep(2)  # watch_launcher's thread says so and ends the process within a second: one line, not two
        return UserError(launcher_gone(rank))
    host = socket.gethostname()
    local = [(r, pid) for r, (h, pid) in enumerate(ranks) if h == host and r != rank]
    deadline = time.monotonic() + wait
    while True:
        gone = [r for r, pid in local if _gone(pid)]
        if gone or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    who = (f"rank {', '.join(map(str, gone))}" if gone else
           "another rank" + (" (on another machine)" if len(local) < len(ranks) - 1 else ""))
    return UserError(f"rank {rank}: {who} stopped (its own output, or the launcher's report, says why), so this "
                     f"rank stops too")
