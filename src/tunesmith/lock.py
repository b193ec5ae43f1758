"""One writer per run folder: an exclusive flock on RUN/.lock while a process trains in it.

Two processes writing one run (a second `--resume` of a running run) would delete each other's
temporary checkpoints and interleave their logs. The kernel releases a flock when its process ends,
kill -9 included, so a lock left by a dead process never blocks: the next writer takes it over. The
file holds the pid of the holder, for the message that refuses a second writer.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import TunesmithError

LOCK_NAME = ".lock"


class FolderLock:
    """Held from acquire() until release() (or the end of the process)."""

    def __init__(self, folder: Path, fd: int):
        self.folder = folder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: Path, command: str) -> "FolderLock":
        """Lock `folder` for this process, or raise naming the pid that holds it. `command` says what
        the holder is doing, for that message ('trains in it')."""
        path = Path(folder) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise TunesmithError(f"{folder}: cannot create the lock file {LOCK_NAME} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            os.close(fd)
            raise TunesmithError(f"{folder}: in use: another tunesmith process (pid {holder}) {command}; "
                                 "wait for it to end, or stop it first") from None
        try:  # the pid only names the holder in the message above; the flock is what locks
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        return cls(Path(folder), fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
