"""Atomic file and folder writes: write under a temporary name beside the target, then rename.
A kill at any moment leaves the old version or the new one, never half of one."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import TunesmithError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_beside(target: Path) -> Path:
    """An empty folder next to `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
    return tmp


def temp_file_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = temp_file_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# what temp_file_beside / temp_dir_beside name: '.' + the target's name + '.' + mkstemp's 8 random characters
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}")


def remove_stale_temps(folder: Path) -> None:
    """Remove the temporary files and folders of writes a kill cut short. Only for a folder whose lock this
    process holds: no write of another process can be in progress there."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if _TEMP_NAME.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def replace_dir(tmp: Path, target: Path) -> None:
    """Move a finished folder into place; the old one is removed only after the new one is there."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Undo a replace_dir interrupted between its two renames."""
    old = target.with_name(target.name + ".old")
    if not target.exists() and old.exists():
        os.replace(old, target)


def write_failed(path: Path, exc: OSError, what: str = "") -> TunesmithError:
    """One line for a write that failed (a full disk, a read-only file system, no permission, no folder)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = "; free some space and try again" if exc.errno == errno.ENOSPC else ""
    return TunesmithError(f"{path}: cannot write{' ' + what if what else ''} ({reason}){hint}")
