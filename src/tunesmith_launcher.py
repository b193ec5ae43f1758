"""The `tunesmith` command's first step: hand the command to a warm worker when one is running for this
environment and this code (`tunesmith worker start`, tunesmith/worker.py), else run it here as always.

This module is outside the tunesmith package on purpose and imports only the standard library: importing
the package imports torch, transformers, pandas and scikit-learn (3-4 s on a 2-core CPU), which is exactly
what a warm worker has done already. A worker is found by a key over everything that could make its
imported code differ from what this process would import: the Python, the environment variables, the
tunesmith source files and the site-packages folders (pip changes a folder's mtime when it installs
or removes a package; PYTHONPATH is one of the variables). A changed variable, a `git pull` or a `pip install` gives a new key, so the command
runs here, cold, and never on stale code.

TUNESMITH_WORKER=0: never hand over. TUNESMITH_WORKER=auto: also start a worker in the background when there is
none, so that the commands after this one (which runs cold) start warm.
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

# Variables that differ between shells, or that a wrapper adds (make: `make demo`), without changing what a
# process imports.
_IGNORED_VARIABLES = {"PWD", "OLDPWD", "SHLVL", "_", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKE_TERMOUT",
                      "MAKE_TERMERR", "MAKEOVERRIDES"}
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


def private_worker_dir() -> Path:
    """worker_dir(), made if needed; refused unless it is this user's and closed to others."""
    directory = worker_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{directory}: must belong to you and be closed to others (chmod 700) to hold "
                              "the worker's socket")
    return directory


def spawn_worker(key: str, idle_minutes: float):
    """Start `python -m tunesmith.worker` for key in the background, in a session of its own (a closed shell
    keeps it), its output in KEY.log beside the socket: (the process, the log's path). None when a worker for
    key is starting or running: it holds KEY.lock (an flock, handed to it here, gone with its process)."""
    import fcntl
    import subprocess

    directory = private_worker_dir()
    lock = os.open(directory / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return None
    log = directory / f"{key}.log"
    try:
        with open(log, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "tunesmith.worker", key, str(idle_minutes * 60), str(lock)], pass_fds=[lock],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True, cwd=directory,
                env={**_TUNESMITH_DEFAULTS, **os.environ})  # as cli.main sets them, before any import
    finally:
        os.close(lock)  # the worker's copy keeps the lock
    return process, log


def hand_over(argv: list[str]) -> int | None:
    """Run `tunesmith argv` in the warm worker for this environment and code, if there is one: its exit code.
    None when there is none (or it cannot take the command): the caller runs the command itself."""
    if (not sys.platform.startswith("linux") or os.environ.get("TUNESMITH_WORKER") == "0"
            or argv[:1] == ["worker"]):  # `tunesmith worker ...` manages the worker: it runs here
        return None
    path = socket_path(command_key())
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError as exc:
        connection.close()
        if isinstance(exc, ConnectionRefusedError):  # the socket of a worker that died (killed, a reboot)
            path.unlink(missing_ok=True)
        if os.environ.get("TUNESMITH_WORKER") == "auto":  # for the commands after this one, which runs cold
            _start_worker_unless_starting()
        return None
    try:
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

    def suspend(_signum: int, _frame) -> None:  # Ctrl-Z: the child stops with this command, and goes on with it
        try:
            os.kill(child["pid"], signal.SIGSTOP)
        except ProcessLookupError:
            pass
        os.kill(os.getpid(), signal.SIGSTOP)  # here until SIGCONT (the shell's fg or bg)

    def resume(_signum: int, _frame) -> None:
        try:
            os.kill(child["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass

    for signum in _FORWARDED:
        if signum not in ignored:
            signal.signal(signum, forward)
    if signal.getsignal(signal.SIGTSTP) != signal.SIG_IGN:
        signal.signal(signal.SIGTSTP, suspend)
        signal.signal(signal.SIGCONT, resume)
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


def _start_worker_unless_starting() -> None:
    """TUNESMITH_WORKER=auto: a worker for this command's key in the background, unless one is starting."""
    try:
        spawn_worker(command_key(), 60)
    except OSError:  # no worker then: this command runs cold all the same
        pass


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
