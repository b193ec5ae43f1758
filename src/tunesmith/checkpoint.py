"""Resumable checkpoints and atomic writes.

A checkpoint is a folder `checkpoints/step-000123/` written under a temporary name and renamed
when complete; the file `checkpoints/latest` (replaced atomically) names the newest one. A kill at
any moment leaves either the previous checkpoint or the new one, never a half-written one in use.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from .atomic import temp_dir_beside, write_text_atomic
from .errors import TunesmithError

KEEP_CHECKPOINTS = 2


@dataclass
class TrainState:
    """Where the loop is; everything needed to continue exactly."""
    step: int = 0              # optimizer steps done
    epoch: int = 0             # current epoch (0-based)
    batch_in_epoch: int = 0    # micro-batches of this epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    samples_seen: int = 0
    extra: dict = field(default_factory=dict)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer, scheduler, state: TrainState) -> Path:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:07d}"
    final = folder / name
    tmp = temp_dir_beside(final)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(folder / "latest", name + "\n")
    for stale in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(stale, ignore_errors=True)
    for partial in folder.glob(".step-*.*"):  # left by a kill during an earlier save
        shutil.rmtree(partial, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    pointer = folder / "latest"
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if (named / "state.json").is_file():
            return named
    complete = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> TrainState:
    try:
        load_model(model, str(path / "model.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
        return read_state(path)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise TunesmithError(f"{path}: checkpoint cannot be loaded ({str(exc).splitlines()[0]})") from None


def read_state(path: Path) -> TrainState:
    """The loop position saved in a checkpoint, without loading anything else."""
    return TrainState(**json.loads((path / "state.json").read_text()))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
