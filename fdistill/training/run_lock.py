"""An advisory lock per run directory, so that two runs never write into one ``run_dir``.

``run_dir/run.lock`` is locked with ``flock`` (released by the kernel when its holder exits, however it exits) and
holds ``<host> <pid>`` of the holder while it runs; a clean exit empties it. A second run finds the lock taken and is
refused by name (``RunDirLocked``, exit code 2 in the CLI). A lock file that still names a holder but is not locked
was left by a process that died (SIGKILL, power loss): it is stale, and the new run takes it over, saying so.
The file is never deleted: unlinking a lock file lets two later runs lock two different files of the same name.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = "run.lock"


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def holder_line() -> str:
    """``'<host> <pid>'`` of this process: what the lock file says while it holds the lock."""
    return f"{socket.gethostname()} {os.getpid()}"


def describe_holder(content: str) -> str:
    """'pid <pid> on host <host>' from a lock file's content (or the raw content when it is not in that form)."""
    parts = content.split()
    return f"pid {parts[1]} on host {parts[0]}" if len(parts) == 2 else repr(content.strip())


class RunLock:
    """The lock of one run directory. ``acquire()`` raises RunDirLocked when a live process holds it and returns
    the stale holder's description (or None) when it took over a dead one's; ``release()`` empties and unlocks."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise RunDirLocked(f"run_dir {self.path.parent} is in use by {describe_holder(holder)} (lock file "
                               f"{self.path}); wait for that run to end or choose another train.run_dir") from None
        stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder_line() + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return describe_holder(stale) if stale else None

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)   # empty = released cleanly (a non-empty unlocked file is a dead holder's)
        os.close(self._fd)          # closing drops the flock
        self._fd = None

