"""The run log: progress lines on stderr and the metrics.jsonl file of a run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .distributed import is_main


def log(message: str) -> None:
    """One progress line on stderr, printed above a running progress bar; by the main process only (the
    others of a several-process launch say the same)."""
    if not is_main():
        return
    tqdm.write(f"tunesmith: {message}", file=sys.stderr)


def warn(message: str) -> None:
    log(f"warning: {message}")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """On resume, forget log lines written after the checkpoint: they will be written again.
    A line cut short by a kill or a full disk is dropped, not read, and the log says so.
    The shortened log replaces the old one atomically: a kill here loses nothing."""
    if not path.is_file():
        return
    keep, torn = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn.append(number)
            continue
        # the test line is written at the end, after the last checkpoint: the resumed run writes it again
        if isinstance(record, dict) and record.get("step", 0) <= step and record.get("type") != "test":
            keep.append(line)
    if torn:
        warn(f"{path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}"
             f"{' ...' if len(torn) > 5 else ''}), cut short by a kill or a full disk")
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def count(n: int) -> str:
    """22,713,986 -> '22.7M'."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
