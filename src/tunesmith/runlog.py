"""The run log: progress lines on stderr and the metrics.jsonl file of a run folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm.auto import tqdm


def log(message: str) -> None:
    """One progress line on stderr, printed above a running progress bar."""
    tqdm.write(f"tunesmith: {message}", file=sys.stderr)


def warn(message: str) -> None:
    log(f"warning: {message}")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """On resume, forget log lines written after the checkpoint: they will be written again.
    A line cut short by a kill or a full disk is dropped, not read."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def count(n: int) -> str:
    """22,713,986 -> '22.7M'."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
