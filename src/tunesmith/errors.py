"""The one exception type users see: a single line saying what is wrong and where."""

from __future__ import annotations

from pathlib import Path


class TunesmithError(Exception):
    """A problem with the user's input (file, config, data). The CLI prints it as one line, exit 2."""


def where(path: str | Path, line: int | None = None, column: str | None = None,
          kind: str = "line") -> str:
    """Format 'file, line N, column 'x'' for error messages."""
    parts = [str(path)]
    if line is not None:
        parts.append(f"{kind} {line}")
    if column is not None:
        parts.append(f"column '{column}'")
    return ", ".join(parts)
