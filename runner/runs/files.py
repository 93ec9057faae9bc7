"""Crash-safe file writes: a kill at any moment leaves the old file or the new one, never a torn one."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from runner.errors import UserError

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(f)`` into a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the folder, so the rename itself survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600: teammates on shared storage could not read it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write names no file: name the one that was being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def overwrite_in_place(path: str | Path, text: str) -> None:
    """Replace a file's content where it is: truncated first, so that on a full disk its own
    blocks make room for the new text (not atomic: for last words, where atomic failed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def append_line(path: str | Path, line: str) -> None:
    """Append one whole line with a single write on an O_APPEND descriptor: readers never see
    half a row, and concurrent appenders never interleave within a row."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# The descriptors of the run-folder locks this process holds. A forked child (a DataLoader
# worker) inherits them, and an flock lives as long as any copy: a worker that outlives a killed
# run for a few seconds would keep the folder locked against its own resume. Children close
# their copies at once; the lock then lives exactly as long as its holder.
_held_locks: set[int] = set()
os.register_at_fork(after_in_child=lambda: [os.close(fd) for fd in list(_held_locks)] and _held_locks.clear())


@contextlib.contextmanager
def hold_folder(run_dir: Path | None) -> Iterator[None]:
    """One process at a time in a run folder: an exclusive lock on ``<run_dir>/.lock``, held
    for the run. The system drops it when its holder exits, however it exits, so a lock left by
    a killed run is never stale; a run that lets go (completed, failed or interrupted) removes
    the file, so its folder holds only its results.

    Removing a lock file races with a process that opened it just before: that process would
    lock the removed file and think it holds the folder, while a third one creates and locks a
    new ``.lock``. So the holder removes the file while it still holds the lock (never after
    letting go), and a process that got the lock checks that ``.lock`` is still the file it
    locked, and starts again where it is not."""
    if run_dir is None:
        yield
        return
    fd = lock_exclusively(Path(run_dir) / ".lock", run_dir)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks.add(fd)
        yield
    finally:
        with contextlib.suppress(OSError):  # however the run ended; while still locked: see the docstring
            (Path(run_dir) / ".lock").unlink()
        _held_locks.discard(fd)
        os.close(fd)  # closing the descriptor releases the lock


def lock_exclusively(path: Path, run_dir: Path) -> int:
    """A descriptor of ``path`` holding its exclusive lock; UserError where another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{run_dir} is in use by another runner process (pid {holder}): wait for it to end, "
                            "or stop it first") from None
        try:
            on_disk, locked = os.stat(path), os.fstat(fd)
            if (on_disk.st_dev, on_disk.st_ino) == (locked.st_dev, locked.st_ino):
                return fd
        except FileNotFoundError:  # its holder removed it as it let go: ours is a removed file
            pass
        os.close(fd)


def folder_in_use(run_dir: Path) -> bool:
    """Whether a live process holds ``run_dir`` (a summary saying ``running`` without one is stale)."""
    try:
        fd = os.open(Path(run_dir) / ".lock", os.O_RDONLY)
    except FileNotFoundError:  # no holder: a holder keeps the file until it lets go
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a line a crash left half-written (the last one) is dropped with a
    warning naming the file, and the run goes on without it."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s, line %d is not a whole row (a write cut short): left out", path, number)
    return rows
