"""The one exception type users see: a single line saying what is wrong and where."""

from __future__ import annotations

import errno
import os
from pathlib import Path


# Every character str.splitlines() breaks on, written as an escape: a message that quotes the user's data (a
# column name or a token holding a newline) stays one line.
_LINE_BREAKS = {ord(c): c.encode("unicode_escape").decode() for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


class TunesmithError(Exception):
    """A problem with the user's input (file, config, data). The CLI prints it as one line, exit 2."""

    def __init__(self, message: str = "", *args: object):
        super().__init__(str(message).translate(_LINE_BREAKS), *args)


def where(path: str | Path, line: int | None = None, column: str | None = None,
          kind: str = "line") -> str:
    """Format 'file, line N, column 'x'' for error messages."""
    parts = [str(path)]
    if line is not None:
        parts.append(f"{kind} {line}")
    if column is not None:
        parts.append(f"column '{column}'")
    return ", ".join(parts)


def not_found(path: Path, what: str = "file") -> TunesmithError:
    """'file not found', unless the path is there but cannot be followed: a symlink loop, a broken link."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return TunesmithError(f"{path}: symlink loop (the link leads back to itself); point it at the {what}")
        if path.is_symlink():
            return TunesmithError(f"{path}: broken symlink (it points to {os.readlink(path)}, which is not there)")
    return TunesmithError(f"{path}: {what} not found")


class Interrupted(TunesmithError):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM (a scheduler, `docker stop`); the message says how to go on.
    The CLI exits with 128 + the signal number, as a shell reports a process the signal ended: 130, 143."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop, raised where SIGINT raises KeyboardInterrupt, so that both unwind
    the same way (temporary files removed by the `except BaseException` of atomic writes)."""
