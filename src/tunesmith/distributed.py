"""Several processes (DDP through accelerate, or FSDP: fsdp.py): who this process is, its share of a batch,
outputs gathered from every process, decisions they all take together, and the `--processes N` launcher.

A launch (`accelerate launch --multi_gpu --num_processes N -m tunesmith train CONFIG`, torchrun, or
`tunesmith train CONFIG --processes N`) starts N copies of the same command. Every copy reads the data and
builds the model the same way (same seed); each one trains on its share of every global batch and DDP
averages the gradients. Only the main process (rank 0) writes the run folder and the log.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import numpy as np
import torch

from .errors import TunesmithError


def rank() -> int:
    """This process's global rank: 0 without a launcher. Read from the environment the launchers set, so
    that it is known before anything distributed has started (the log needs it first)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def _state():
    """accelerate's process state, started here the first time. On a machine without CUDA, accelerate forms
    a process group (gloo) only when told the run is on CPUs: without cpu=True each process of a CPU launch
    would train alone."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def processes() -> int:
    """How many processes train together (1 without a launcher)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) == 1:
        return 1
    return _state().num_processes


def check_supported() -> None:
    """DDP and FSDP (fsdp.py); DeepSpeed shards the weights its own way, and the run folder's checkpoints are
    whole models."""
    if processes() == 1:
        return
    kind = str(_state().distributed_type).rsplit(".", 1)[-1]
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" or kind == "DEEPSPEED":
        raise TunesmithError("accelerate launch --use_deepspeed: not supported (tunesmith saves whole-model "
                             "checkpoints); launch without it for DDP, or with --use_fsdp, see docs/distributed.md")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        from .fsdp import check_options
        check_options()


def one_process_only(command: str) -> None:
    """cv and search write their own folders from one process (each fold or trial is a plain run)."""
    if processes() > 1:
        raise TunesmithError(f"tunesmith {command} runs in one process; start it without a launcher"
                             + (" (several search workers: start the same command several times with one "
                                "--storage)" if command == "search" else ""))


def share(batch: list[int], n: int, index: int) -> list[int]:
    """Process `index`'s part of a global batch: contiguous, sizes differing by at most one. Contiguous
    keeps a length-grouped batch's similar lengths together on each process (little padding)."""
    return [int(i) for i in np.array_split(np.asarray(batch, dtype=np.int64), n)[index]]


def barrier() -> None:
    if processes() > 1:
        _state().wait_for_everyone()


def broadcast(value: Any) -> Any:
    """The main process's `value`, on every process (any picklable object)."""
    if processes() == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value], from_process=0)[0]


def gather(value: Any) -> list:
    """Every process's `value` (picklable), in rank order, on every process."""
    if processes() == 1:
        return [value]
    import torch.distributed as dist
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_max(values: list[float], device: torch.device) -> list[float]:
    """The largest of each value over the processes: one small all-reduce."""
    if processes() == 1:
        return values
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the processes (the same shape on each)."""
    if processes() == 1:
        return t
    import torch.distributed as dist
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


# ---------------------------------------------------------------- the launcher

def launch(n: int, argv: list[str], fsdp: bool = False) -> int:
    """`tunesmith ARGV` in n processes on this machine, started by accelerate's launcher (torch's elastic
    launcher underneath: it ends the others when one fails). Returns the first failed process's exit code.

    --multi_gpu is accelerate's switch for its torch.distributed launcher; on a machine without CUDA the
    processes then form a gloo group on the CPU (without it accelerate starts a single process on CPUs).
    fsdp: --use_fsdp instead (the same launcher; the processes shard the model, fsdp.py).
    The port is a free one, so that two launches on one machine do not meet on accelerate's fixed 29500."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args([
        *(["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]),
        "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "--module", "tunesmith", *argv])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))  # n processes share the cores
    try:
        launch_command(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c > 0), 128 + abs(codes[0]) if codes else 1)
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
