"""One training run per output folder: an exclusive lock on `<output_dir>/.train.lock`.

Two runs writing into one folder corrupt each other: each rotates away the other's checkpoint in
progress, and their checkpoints of the same step silently mix. The first run to start holds an
operating-system lock on the lock file (`flock`, or `msvcrt.locking` on Windows) until it exits;
the kernel drops the lock when the process dies however it dies, so a crashed run never blocks the
next one. The file's text says who holds it (PID, host, start time), so a refused run can name it,
and a run that finds the text of a holder that is gone reports that stale lock before taking over.

Only the main process (global rank 0) takes the lock: the other ranks of the same run share the folder.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"


class OutputDirLocked(RuntimeError):
    """Another live run holds the output folder; the message names its PID and what to do."""


def _try_lock(fd: int) -> bool:
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
    except OSError:  # Windows refuses to read a region another process has locked
        return {}
    try:
        holder = json.loads(raw.decode("utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that did not record itself"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {started}"


class OutputLock:
    """Held for the lifetime of a run: `OutputLock.acquire(folder)`, then `release()` (also on exit, by the OS)."""

    def __init__(self, path: Path, fd: int, stale: Optional[dict]):
        self.path, self.fd = path, fd
        self.stale = stale  # the record left by a run that ended without releasing, if any

    @classmethod
    def acquire(cls, output_dir: str | Path) -> "OutputLock":
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputDirLocked(
                    f"output folder {folder} is in use by another training run ({_describe(holder)}): two runs in one "
                    f"folder delete each other's checkpoints. Wait for that run to end, stop it, or pass another "
                    f"--output-dir (the lock is {path})")
            # The holder we waited for may have removed the file as it released it; lock the file that is there now.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_holder(fd)
        stale = previous if previous and previous.get("pid") != os.getpid() else None
        if stale:
            log.warning("output folder %s: the previous run (%s) ended without releasing its lock (it crashed or was "
                        "killed); taking over. Its checkpoints are kept; --resume latest continues from them.",
                        folder, _describe(stale))
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, record)
        os.fsync(fd)
        return cls(path, fd, stale)

    def release(self) -> None:
        """Remove the record, then unlock; a run that crashes skips this and the OS unlocks for it."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)  # before unlocking, so a waiting run re-checks the file (see acquire)
        except OSError:  # already gone, or Windows, where an open file cannot be removed
            pass
        os.close(self.fd)  # closing the descriptor drops the lock
        self.fd = -1

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
