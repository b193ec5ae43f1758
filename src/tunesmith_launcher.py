"""The `tunesmith` command's first step: hand the command to a warm worker when one is running for this
environment and this code (`tunesmith worker start`, tunesmith/worker.py), else run it here as always.

This module is outside the tunesmith package on purpose and imports only the standard library: importing
the package imports torch, transformers, pandas and scikit-learn (3-4 s on a 2-core CPU), which is exactly
what a warm worker has done already. A worker is found by a key over everything that could make its
imported code differ from what this process would import: the Python, the environment variables, the
tunesmith source files and the site-packages folders (pip changes a folder's mtime when it installs
or removes a package; PYTHONPATH is one of the variables). A changed variable, a `git pull` or a `pip install` gives a new key, so the command
runs here, cold, and never on stale code.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import site
import socket
import sys
from importlib.util import find_spec
from pathlib import Path

# Variables that differ between shells without changing what a process imports.
_IGNORED_VARIABLES = {"PWD", "OLDPWD", "SHLVL", "_"}
# Set by tunesmith.cli.main when absent: the same key with or without them at these values.
_TUNESMITH_DEFAULTS = {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def process_start_since_boot() -> float | None:
    """When this process started, in seconds since boot (/proc/self/stat field 22); None off Linux."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def seconds_since_boot() -> float | None:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def worker_dir() -> Path:
    """Where the workers' sockets live: one folder per user that only that user may enter."""
    base = os.environ.get("TUNESMITH_WORKER_DIR")
    if base:
        return Path(base)
    import tempfile
    return Path(tempfile.gettempdir()) / f"tunesmith-{os.getuid()}"


def environment_key(environ: dict[str, str] | None = None) -> str:
    """What a worker's imports depend on, hashed: see the module docstring."""
    environ = dict(os.environ if environ is None else environ)
    variables = sorted((k, v) for k, v in environ.items()
                       if k not in _IGNORED_VARIABLES and _TUNESMITH_DEFAULTS.get(k) != v)
    code = []
    spec = find_spec("tunesmith")  # finds the package without running it
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(root).rglob("*.py")):
            stat = path.stat()
            code.append((str(path), stat.st_mtime_ns, stat.st_size))
    launcher = Path(__file__).stat()
    # site-packages, not sys.path: sys.path starts with the script's folder, and imported packages extend it
    folders = [(p, os.stat(p).st_mtime_ns) for p in site.getsitepackages() if os.path.isdir(p)]
    stamp = [sys.executable, sys.version, variables, code, (launcher.st_mtime_ns, launcher.st_size), folders]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:24]


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)  # passed on to the worker's child
_COMMAND_KEY: str | None = None  # this command's key, taken before anything ran (imports set variables)


def command_key() -> str:
    """The key of this `tunesmith` command's environment and code, as it started."""
    return _COMMAND_KEY or environment_key()


def socket_path(key: str) -> Path:
    return worker_dir() / f"{key}.sock"


def hand_over(argv: list[str]) -> int | None:
    """Run `tunesmith argv` in the warm worker for this environment and code, if there is one: its exit code.
    None when there is none (or it cannot take the command): the caller runs the command itself."""
    if (not sys.platform.startswith("linux") or os.environ.get("TUNESMITH_WORKER") == "0"
            or argv[:1] == ["worker"]):  # `tunesmith worker ...` manages the worker: it runs here
        return None
    path = socket_path(command_key())
    if not path.exists():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
        # a signal this command ignores (nohup, a script's `&` for SIGINT) is ignored by the child too
        ignored = [int(s) for s in _FORWARDED if signal.getsignal(s) == signal.SIG_IGN]
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
                              "umask": _umask(), "started": process_start_since_boot(),
                              "ignored_signals": ignored}).encode()
        message = len(request).to_bytes(4, "big") + request
        sent = socket.send_fds(connection, [message], [0, 1, 2])  # the worker's child writes to our terminal
        connection.sendall(message[sent:])
        replies = connection.makefile("rb")
        child = json.loads(replies.readline() or b"null")
    except (OSError, ValueError):  # a worker that died (a stale socket), closed standard streams: run here
        connection.close()
        return None
    if not isinstance(child, dict) or "pid" not in child:
        connection.close()
        return None

    def forward(signum: int, _frame) -> None:  # Ctrl-C and kill reach this process: pass them on
        try:
            os.kill(child["pid"], signum)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        if signum not in ignored:
            signal.signal(signum, forward)
    try:
        status = json.loads(replies.readline() or b"null")
    except (OSError, ValueError):
        status = None
    connection.close()
    if not isinstance(status, dict) or "exit" not in status:
        print("error: the warm tunesmith worker stopped before the command finished (tunesmith worker status)",
              file=sys.stderr)
        return 1
    code = int(status["exit"])
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main() -> None:
    """The `tunesmith` command."""
    global _COMMAND_KEY
    _COMMAND_KEY = environment_key()
    code = hand_over(sys.argv[1:])
    if code is not None:
        sys.stdout.flush()
        os._exit(code)
    from tunesmith.cli import run
    run()


if __name__ == "__main__":
    main()
