"""Reading the user's JSON files, and writing every file nanolisa produces atomically.

A file or directory nanolisa writes is first written under a temporary name in the same directory, then
renamed into place: a rename within one file system is atomic, so a crash, a kill or a full disk leaves
either the old contents or the new, never half of one. The temporary name starts with `.tmp-` and is
removed when the write fails.

Permissions: `tempfile` creates files 0600 and directories 0700 (private), which would make a saved model
unreadable for a serving container running as another user. Everything written here gets the permissions
the user's umask gives a new file or directory, as `open()` and `mkdir` would.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

from nanolisa.errors import UserError


def write_failure(what: str, e: BaseException) -> UserError:
    """A failed write (full disk, file-size limit, permissions) as one line; the caller has removed any
    partial files."""
    reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[-1][:200]
    return UserError(f"could not write {what} ({reason}); nothing partial was left behind. Free some disk "
                     f"space (or fix the permissions) and run again")


def read_json(path: str) -> Any:
    """A JSON file that came from the user (a config, an adapter, a tokenizer file): unreadable or invalid
    JSON is a UserError that names the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable as JSON ({e})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path`, on failure it is
    removed. mode "w" (text, UTF-8) or "wb"."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def umask_mode(path: str) -> None:
    """Give a file another library wrote (safetensors writes 0600) the permissions the umask gives."""
    os.chmod(path, 0o666 & ~_umask())


def write_text(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
    """Write obj as JSON (sorted keys, trailing newline), atomically."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def copy_file(src: str, dst: str) -> None:
    """Copy src to dst atomically (dst gets umask permissions, not src's)."""
    with atomic_file(dst, "wb") as f, open(src, "rb") as g:
        shutil.copyfileobj(g, f)


def new_staging_dir(parent: str, prefix: str = ".tmp-save-") -> str:
    """A fresh temporary directory in `parent`, with umask permissions."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextmanager
def staging_dir(out_dir: str, prefix: str = ".tmp-save-") -> Iterator[str]:
    """A temporary directory on the same file system as out_dir, so it can be renamed into place: inside
    out_dir when that exists (a later run finds and removes what a killed one left there), else beside it.
    Removed with everything in it if the block raises."""
    tmp = new_staging_dir(out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir)), prefix)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install_dir(tmp: str, out_dir: str, stale: Callable[[str], bool] = lambda name: False,
                last: str | None = None) -> None:
    """Move a fully written directory into place. When out_dir is new (or empty) this is one rename.
    Otherwise the files are moved in one by one, `last` at the end (config.json: a reader sees a complete
    model or the old one), files of out_dir for which `stale(name)` holds and that the new save does not
    replace are removed, and everything else in out_dir (a run's checkpoints/, say) is kept."""
    if not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
        return
    new = set(os.listdir(tmp))
    for name in os.listdir(out_dir):  # (tmp itself may sit in out_dir: its .tmp- name is never stale)
        if name not in new and stale(name) and os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for name in sorted(new, key=lambda n: n == last):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def remove_in_background(path: str) -> None:
    """Remove a directory without waiting for it: renamed at once to a `.tmp-` name beside it (so nothing
    reads it as what it was, and the next run's start-up clears what a killed process left), then deleted by
    a background thread. Deleting a large checkpoint can take minutes on some file systems; meanwhile the
    run goes on (no rank waits for rank 0's file system), and `wait_for_removals` ends it."""
    if not os.path.exists(path):
        return
    doomed = new_staging_dir(os.path.dirname(os.path.abspath(path)), ".tmp-removing-")
    os.rmdir(doomed)
    os.replace(path, doomed)
    thread = threading.Thread(target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True})
    thread.start()
    _removals.append(thread)


_removals: list[threading.Thread] = []  # the removals still running


def wait_for_removals() -> None:
    """Wait for every `remove_in_background` of this process: a run that returns has left --out as it is."""
    while _removals:
        _removals.pop().join()
