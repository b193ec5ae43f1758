"""In-memory data for the Python API: a pandas DataFrame, a list of dicts (or of texts, to predict) or a
Hugging Face `datasets.Dataset` stands wherever a file path would (data.train / validation / test of a
config, evaluate's data, predict's input).

Inside an API call, each such object is registered under a token ("memory:data.train:<hash>") that the
readers take like a path, so the same checks run and errors name the argument and the row:
`data.train (DataFrame), index 17, column 'text': empty text`. A run folder never refers to memory: its
config points at a JSONL copy written into the folder (`data/`), so --resume, evaluate and predict
work later from files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import TunesmithError

PREFIX = "memory:"
DATA_KEYS = ("train", "validation", "test")
_REGISTRY: dict[str, tuple[pd.DataFrame, str, list[str]]] = {}  # token -> (frame, display name, row names)


def is_in_memory(value: Any) -> bool:
    """A DataFrame, a Dataset, or a list/tuple of records or texts (not a path)."""
    return isinstance(value, (pd.DataFrame, list, tuple)) or type(value).__name__ in ("Dataset", "IterableDataset")


def is_text_list(value: Any) -> bool:
    """A plain list of strings: texts to predict, or image paths (the task decides which)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def is_token(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def to_frame(value: Any, name: str, text_column: str = "text") -> tuple[pd.DataFrame, str, list[str]]:
    """The object as a DataFrame, its display name, and how each row is named in errors."""
    kind = type(value).__name__
    if isinstance(value, pd.DataFrame):
        frame = value.reset_index(drop=True)
        return frame, f"{name} (DataFrame)", [f"index {i!r}" for i in value.index]
    if kind == "IterableDataset":
        raise TunesmithError(f"{name}: a streaming IterableDataset cannot be read whole; pass a datasets.Dataset")
    if kind == "Dataset" and hasattr(value, "to_pandas"):
        frame = value.to_pandas()
        return frame, f"{name} (Dataset)", [f"row {i}" for i in range(len(frame))]
    if isinstance(value, (list, tuple)):
        if not value:
            raise TunesmithError(f"{name}: empty list: no examples")
        if all(isinstance(v, str) for v in value):
            frame = pd.DataFrame({text_column: list(value)})
        else:
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise TunesmithError(f"{name}, item {i}: expected a dict of column values (like a JSONL record), "
                                         f"got {type(item).__name__}")
            frame = pd.DataFrame.from_records(list(value))
        return frame, f"{name} (list)", [f"item {i}" for i in range(len(frame))]
    raise TunesmithError(f"{name}: expected a file path, a pandas DataFrame, a list of dicts or a datasets.Dataset "
                         f"(got {kind})")


def register(value: Any, name: str, text_column: str = "text") -> str:
    frame, shown, rows = to_frame(value, name, text_column)
    if len(frame) == 0:
        raise TunesmithError(f"{shown}: no rows")
    digest = hashlib.sha1(frame.to_json(orient="records", lines=True, force_ascii=False,
                                        default_handler=str).encode()).hexdigest()[:12]
    token = f"{PREFIX}{name}:{digest}"
    _REGISTRY[token] = (frame, shown, rows)
    return token


def lookup(token: str) -> tuple[pd.DataFrame, str, list[str]]:
    if token not in _REGISTRY:
        raise TunesmithError(f"{token}: in-memory data exists only during the call that was given it; "
                             "write it to a file to use it again")
    frame, shown, rows = _REGISTRY[token]
    return frame.copy(), shown, rows


@contextmanager
def in_memory_data(config: Any, overrides: dict[str, Any] | None = None) -> Iterator[tuple[Any, dict | None]]:
    """(config, overrides) with in-memory data.train/validation/test replaced by tokens, valid inside
    the block; the data may sit in a config dict or in overrides such as {"data.train": frame}."""
    tokens: list[str] = []

    def tokenise(value: Any, key: str, text_column: str) -> Any:
        if not is_in_memory(value):
            return value
        token = register(value, f"data.{key}", text_column)
        tokens.append(token)
        return token

    try:
        if isinstance(config, dict) and isinstance(config.get("data"), dict):
            data = dict(config["data"])
            for key in DATA_KEYS:
                data[key] = tokenise(data.get(key), key, data.get("text_column", "text"))
            config = {**config, "data": {k: v for k, v in data.items() if v is not None or k in config["data"]}}
        if overrides:
            overrides = {k: tokenise(v, k[5:], "text") if k in {f"data.{d}" for d in DATA_KEYS} else v
                         for k, v in overrides.items()}
        yield config, overrides
    finally:
        for token in tokens:
            _REGISTRY.pop(token, None)


@contextmanager
def in_memory_input(value: Any, name: str, text_column: str = "text") -> Iterator[Any]:
    """One input (evaluate's data, predict's input): a token inside the block when it is in memory."""
    if not is_in_memory(value):
        yield value
        return
    token = register(value, name, text_column)
    try:
        yield token
    finally:
        _REGISTRY.pop(token, None)


def persist(cfg, folder: Path, write: bool = True):
    """The config with every in-memory split written to folder/data/<split>-<hash>.jsonl, for a run
    (or cv / search) folder that must not depend on memory; a config without any is returned as is.
    With write=False only the paths change (to compare with a folder's saved config first)."""
    updates = {}
    for key in DATA_KEYS:
        token = getattr(cfg.data, key)
        if is_token(token):
            path = folder / "data" / f"{key}-{token.rsplit(':', 1)[-1]}.jsonl"
            if write and not path.is_file():
                from .inference import write_frame_atomic
                write_frame_atomic(lookup(token)[0], path)
            updates[key] = str(path)
    if not updates:
        return cfg
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=updates)})


def shown(source: Any) -> str:
    """How errors name a data source: the file path, or the in-memory argument ('data.train (DataFrame)')."""
    if is_token(source):
        return _REGISTRY[source][1] if source in _REGISTRY else source.split(":")[1]
    return str(source)


def stem(source: str | None) -> str:
    """A name for run folders from a data source: the file's stem, or 'data' for in-memory data."""
    if source is None:
        return "run"
    return "data" if is_token(source) else Path(source).stem
