"""Where a command's seconds go before and after training (the fixed costs a user waits for)."""

from __future__ import annotations

import os
import time
from pathlib import Path

_IMPORTED = time.perf_counter()  # the fallback origin where /proc is not there


def process_seconds() -> float:
    """Seconds since this process started (Python start-up and imports included), read from /proc on
    Linux; elsewhere since tunesmith was imported."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def format_seconds(seconds: dict[str, float]) -> str:
    """{'read_data': 0.31, 'load_model': 0.52} -> 'read data 0.3s, load model 0.5s'"""
    return ", ".join(f"{name.replace('_', ' ')} {value:.1f}s" for name, value in seconds.items())
