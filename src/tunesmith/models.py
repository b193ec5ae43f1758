"""Backbone resolution (catalog name | local folder | hub id), loading, and the optimizer's
parameter groups."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from . import catalog
from .errors import TunesmithError


def resolve_model(name: str) -> str:
    """A local folder for catalog names and paths; hub ids are returned unchanged."""
    folder = catalog.model_path(name)
    if folder is not None:
        return str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunesmithError(f"{path}: model folder has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix:
        raise TunesmithError(f"model '{name}': folder not found (catalog names: {', '.join(catalog.MODELS)})")
    return name


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def from_pretrained(loader: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with one clear error instead of a minute of hub retries."""
    is_local = Path(source).is_dir()
    try:
        if not is_local:
            try:  # the hub id may already be in the local Hugging Face cache
                return loader(source, local_files_only=True, **kwargs)
            except OSError:
                if not _hub_reachable():
                    raise TunesmithError(
                        f"model '{source}' is not a catalog name ({', '.join(catalog.MODELS)}) or a local folder, "
                        "and the Hugging Face hub cannot be reached (offline?)") from None
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunesmithError(f"model '{source}': could not load: {first}") from None


def parameter_groups(params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                     lr: float | None = None, name: str = "") -> list[dict]:
    """AdamW groups: no weight decay on biases and normalisation weights (1-D tensors).

    Strategies call this once per layer (`name` e.g. 'layer.3', with that layer's `lr`);
    empty groups are left out.
    """
    named = params.named_parameters() if isinstance(params, torch.nn.Module) else params
    decay, no_decay = [], []
    for param_name, param in named:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in param_name.lower() else decay).append(param)
    prefix = f"{name}/" if name else ""
    groups = [{"params": decay, "weight_decay": weight_decay, "name": prefix + "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": prefix + "no_decay"}]
    if lr is not None:
        for group in groups:
            group["lr"] = lr
    return [g for g in groups if g["params"]]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
