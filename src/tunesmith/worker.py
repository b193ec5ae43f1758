"""A warm worker: one background process that has imported torch, transformers and every task once, and
forks a child for each `tunesmith` command (the way build daemons keep a warm JVM). Imports are most of a
command's start-up on a CPU (bench/README.md, "Start-up"); a child starts with them done.

    tunesmith worker start      # in the background; serves this environment and this code only
    tunesmith train config.yaml # handed to the worker by the `tunesmith` command (tunesmith_launcher.py)
    tunesmith worker stop

The command (tunesmith_launcher.py) sends its arguments, folder, environment variables, umask and its
standard streams (the file descriptors themselves, so a terminal stays a terminal) over a Unix socket;
the child takes them over and runs the CLI as the command would; the worker sends back the child's exit
status. Ctrl-C and kill reach the command, which forwards them to the child; if the command dies, the
child is sent SIGTERM (it checkpoints and stops, as on a terminal's hang-up). The worker never runs a
torch operation itself: an OpenMP thread pool made before fork() would be unusable in the children.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from importlib import import_module

from tunesmith_launcher import command_key, private_worker_dir, socket_path, spawn_worker, worker_dir

from .errors import TunesmithError

# What a command imports after its start: the transformers classes of the catalog's models (a model's
# modeling file pulls in most of transformers), and the image libraries (the image task imports them).
_PRELOAD = ("tunesmith.cli", "tunesmith.train", "tunesmith.inference", "tunesmith.cv", "tunesmith.search",
            "tunesmith.report", "transformers.models.bert.modeling_bert", "transformers.models.mpnet.modeling_mpnet",
            "transformers.models.llama.modeling_llama", "transformers.models.auto.tokenization_auto",
            "safetensors.torch", "timm", "torchvision")


def start(idle_minutes: float) -> str:
    """Start the worker for this environment and code in the background; returns a line saying so."""
    key = command_key()
    running = _worker_pid(key)
    if running:
        return f"a worker for this environment and code is running already (pid {running})"
    try:
        spawned = spawn_worker(key, idle_minutes)
    except PermissionError as exc:
        raise TunesmithError(str(exc)) from None
    if spawned is None:
        return "a worker for this environment and code is starting already (tunesmith worker status)"
    process, log = spawned
    started = time.monotonic()
    path, deadline = socket_path(key), time.monotonic() + 600
    while not path.exists():
        if time.monotonic() > deadline:
            process.kill()
            raise TunesmithError(f"the worker did not start within 10 minutes; see {log}")
        if process.poll() is not None:
            raise TunesmithError(f"the worker stopped while starting (exit code {process.returncode}); see {log}")
        time.sleep(0.05)
    return (f"worker ready in {time.monotonic() - started:.1f}s (pid {process.pid}); `tunesmith` commands in this "
            f"environment now start warm; it stops after {idle_minutes:g} idle minutes or with `tunesmith worker stop`")


def stop() -> str:
    """Stop the worker for this environment and code (running commands finish first)."""
    key = command_key()
    pid = _worker_pid(key)
    if not pid:
        return "no worker is running for this environment and code"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while socket_path(key).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"worker stopped (pid {pid}); commands it was running finish first"


def status() -> str:
    """Whether a worker serves this environment and code, and the other workers of this user."""
    key = command_key()
    pid = _worker_pid(key)
    others = [p.stem for p in worker_dir().glob("*.sock") if p.stem != key] if worker_dir().is_dir() else []
    lines = [f"this environment and code: worker pid {pid}" if pid else
             "this environment and code: no worker (commands start cold; tunesmith worker start)"]
    if others:  # started in another environment, or before the code or the packages changed
        lines.append(f"{len(others)} other worker(s) in {worker_dir()}, for other environments or code: they stop "
                     "when idle")
    return "\n".join(lines)


def _worker_pid(key: str) -> int | None:
    """The pid of the live worker for key, from its socket's peer credentials; a dead one's socket is removed."""
    path = socket_path(key)
    if not path.exists():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(path))
        connection.sendall((0).to_bytes(4, "big"))  # an empty request: the worker only closes it
        pid, _, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
        return pid
    except ConnectionRefusedError:  # its process is gone
        path.unlink(missing_ok=True)
        return None
    except OSError:
        return None
    finally:
        connection.close()


# ---------------------------------------------------------------- the worker process

def serve(key: str, idle_seconds: float, lock_fd: int) -> None:
    """Import, listen, fork a child per command, report each child's exit status; stop when asked (SIGTERM)
    or after idle_seconds without a command, once the running children have finished."""
    environ = dict(os.environ)
    for name in _PRELOAD:
        import_module(name)
    # what the imports put into the environment (torch: KMP_*, TORCHINDUCTOR_CACHE_DIR): a cold command has them
    set_by_imports = {k: v for k, v in os.environ.items() if environ.get(k) != v}
    # The imported objects out of the garbage collector's reach: a collection in a child would otherwise write
    # to every one of them, copying the worker's memory page by page (gc.freeze's documented use: pre-fork servers).
    gc.collect()
    gc.freeze()
    directory, path = private_worker_dir(), socket_path(key)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening = directory / f".{key}.{os.getpid()}.sock"
    listener.bind(str(listening))
    listener.listen(16)
    os.replace(listening, path)  # clients see the socket only once it accepts
    inode = path.stat().st_ino
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    wake_read, wake_write = os.pipe()  # a finished child (SIGCHLD) or SIGTERM wakes the select() below at once
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: dict[int, socket.socket] = {}
    last_active = time.monotonic()
    while True:
        while children:  # report every finished child
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = children.pop(pid, None)
            if connection is not None:
                _reply(connection, {"exit": os.waitstatus_to_exitcode(wait_status)})
                connection.close()
            last_active = time.monotonic()
        idle = not children and time.monotonic() - last_active > idle_seconds
        try:  # its socket removed, or taken over by another worker started for the same key: stop
            replaced = path.stat().st_ino != inode
        except FileNotFoundError:
            replaced = True
        if replaced:
            stopping.set()
        if (stopping.is_set() or idle) and listener.fileno() != -1:
            listener.close()
            if not replaced:
                path.unlink(missing_ok=True)
        if listener.fileno() == -1:
            if not children:
                log = directory / f"{key}.log"  # start() sends the worker's output there: kept if it said anything
                if log.is_file() and log.stat().st_size == 0:
                    log.unlink()
                (directory / f"{key}.lock").unlink(missing_ok=True)  # its flock goes with this process
                return
            time.sleep(0.1)
            continue
        try:
            ready, _, _ = select.select([listener, wake_read], [], [], 1.0)
        except InterruptedError:
            continue
        if wake_read in ready:
            os.read(wake_read, 512)
        if listener in ready:
            connection, _ = listener.accept()
            own = [listener.fileno(), wake_read, wake_write, lock_fd, *(c.fileno() for c in children.values())]
            pid = _take(connection, own, set_by_imports)
            if pid:
                children[pid] = connection
                last_active = time.monotonic()
            else:
                connection.close()


def _take(connection: socket.socket, worker_fds: list[int], set_by_imports: dict[str, str]) -> int | None:
    """Read a command's request and fork its child (which closes worker_fds, the worker's own); the child's
    pid, or None for a request not to run."""
    connection.settimeout(10)
    fds: list[int] = []
    request = None
    try:
        uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))[1]
        data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
        length, body = int.from_bytes(data[:4], "big"), data[4:]
        while len(data) >= 4 and len(body) < length:
            chunk = connection.recv(1 << 16)
            if not chunk:
                break
            body += chunk
        if uid == os.getuid() and len(fds) == 3 and length and len(body) == length:  # else: not a command
            request = json.loads(body)
            request["env"] = {**request["env"], **set_by_imports}
    except (OSError, ValueError, KeyError, TypeError):
        request = None
    finally:
        connection.settimeout(None)
    if request is None:  # `worker status` and `stop` only connect; anything else malformed is dropped too
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            for fd in worker_fds:
                os.close(fd)
            _run_child(connection, fds, request)
        finally:
            os._exit(1)  # never back into the worker's loop
    for fd in fds:
        os.close(fd)
    _reply(connection, {"pid": pid})
    return pid


def _reply(connection: socket.socket, message: dict) -> None:
    try:
        connection.sendall(json.dumps(message).encode() + b"\n")
    except OSError:  # the command is gone
        pass


def _run_child(connection: socket.socket, fds: list[int], request: dict) -> None:
    """Become the command: its streams, folder, environment and arguments; then the CLI, which exits."""
    import random

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for signum in request.get("ignored_signals", []):
        signal.signal(signum, signal.SIG_IGN)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # as Python sets them up for a terminal or a file
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["tunesmith", *request["argv"]]
    sys.path[:] = request["path"]
    random.seed()  # fresh entropy, as a new process has (runs seed their own generators from the config)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    from . import timing
    timing.adopt_process_start(request["started"])

    def hang_up_with_the_command() -> None:  # the command died (its terminal closed, SIGKILL): stop cleanly
        try:
            connection.recv(1)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=hang_up_with_the_command, daemon=True).start()
    from .cli import run
    try:
        run()  # leaves with os._exit once the command is done
        code = 0
    except SystemExit as exc:  # argparse's --help, as Python ends a process on SystemExit
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:  # what would end a cold command with a traceback ends this one so too
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # started by spawn_worker(): python -m tunesmith.worker KEY IDLE_SECONDS LOCK_FD
    serve(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
