"""Where a command's seconds go before and after training (the fixed costs a user waits for)."""

from __future__ import annotations

import time

from tunesmith_launcher import process_start_since_boot, seconds_since_boot

_IMPORTED = time.perf_counter()  # the fallback origin where /proc is not there
_COMMAND_STARTED: float | None = None  # set in a warm worker's child: when the `tunesmith` command started


def adopt_process_start(started_since_boot: float | None) -> None:
    """A warm worker's child (worker.py) counts from the start of the `tunesmith` command it runs for, not
    from its own fork."""
    global _COMMAND_STARTED
    _COMMAND_STARTED = started_since_boot


def started_by_worker() -> bool:
    return _COMMAND_STARTED is not None


def process_seconds() -> float:
    """Seconds since this process started (Python start-up and imports included), read from /proc on
    Linux; elsewhere since tunesmith was imported. In a warm worker's child: since its command started."""
    started = _COMMAND_STARTED if _COMMAND_STARTED is not None else process_start_since_boot()
    now = seconds_since_boot()
    if started is None or now is None:
        return time.perf_counter() - _IMPORTED
    return max(0.0, now - started)


def format_seconds(seconds: dict[str, float]) -> str:
    """{'read_data': 0.31, 'load_model': 0.52} -> 'read data 0.3s, load model 0.5s'"""
    return ", ".join(f"{name.replace('_', ' ')} {value:.1f}s" for name, value in seconds.items())
