"""The task interface, and the pieces every task shares.

A task is one module in this package that provides every name of `Task` below, plus one line in the
registry (tasks/__init__.py). The generic modules (train, loop, inference, cv, search, imbalance,
augment) only call these functions: they never name a task or branch on which one they have; what
differs between tasks (are there classes? what does one example's output look like?) is asked here.

Examples objects (one per split, the task's own type) have len(), .subset(indices), .targets (None
when unlabelled) and .groups (None without data.group_column).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import (GroupKFold, GroupShuffleSplit, KFold, ShuffleSplit, StratifiedGroupKFold,
                                     StratifiedKFold, StratifiedShuffleSplit)

from .. import catalog, inputs
from ..config import Config, DataConfig
from ..errors import TunesmithError

IGNORE = -100  # label of positions the loss skips (sub-tokens, padding): PyTorch's cross-entropy ignore_index


@dataclass
class Splits:
    train: Any
    validation: Any | None
    test: Any | None
    labels: Any


@dataclass
class Encoded:
    """Model inputs of one split: one feature dict per input (a long text may give several windows)."""
    features: list[dict]
    lengths: list[int]              # cost of each input (tokens), for length-grouped batches
    truncated: int = 0              # inputs longer than the model takes (cut, or split into windows)
    doc_index: list[int] | None = None  # windows: the example each feature belongs to
    num_examples: int = 0
    dropped_words: int = 0          # token classification: words past the limit (predicted O)
    max_length: int = 0             # the input length limit used (tokens)
    inputs_vary: bool = False       # collate draws new inputs for every batch (MLM masking): no feature cache
    # tasks that write text (causal_lm): generate(model, outputs, batch_size, device, precision) -> outputs, run by
    # inference.example_outputs after the forward pass (it adds each example's generated text)
    generate: Callable | None = None


class Task(Protocol):
    """What a task module provides (checked for every registered task by tests/test_tasks.py)."""
    NAME: str

    # ---- data
    def load_splits(self, cfg: Config) -> Splits: ...
    def read_examples(self, source: Any, cfg: Config, labels: Any, require_labels: bool = True) -> Any: ...
    def labels_from_dict(self, saved: dict) -> Any: ...
    def has_classes(self, labels: Any) -> bool: ...
    def example_classes(self, targets: Any, labels: Any) -> list[np.ndarray]: ...
    def class_ids(self, name: str, labels: Any) -> list[int]: ...
    def stratify_by(self, examples: Any, labels: Any) -> np.ndarray | None: ...
    def map_words(self, examples: Any, fn: Callable) -> Any: ...
    def show_examples(self, examples: Any) -> list[str]: ...

    # ---- model
    def build_model(self, source: str, labels: Any, cfg: Config) -> tuple[torch.nn.Module, Any]: ...
    def load_model(self, folder: Path, cfg: Config) -> tuple[torch.nn.Module, Any]: ...
    def save_processor(self, processor: Any, folder: Path) -> None: ...

    # ---- features, loss, outputs
    def encode(self, processor: Any, examples: Any, cfg: Config, train: bool = False, epoch: int = 0) -> Encoded: ...
    def describe_inputs(self, enc: Encoded, cfg: Config) -> str: ...
    def make_collate(self, processor: Any, multiple: int) -> Callable[[list[dict]], dict]: ...
    def forward(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def extra_loss_weights(self, cfg: Config, labels: Any) -> np.ndarray | None: ...
    def auto_lr(self, strategy: str, batch_size: int) -> float: ...
    def auto_min_steps(self) -> int: ...
    def cpu_bf16_needs_amx(self) -> bool: ...
    def split_outputs(self, logits: np.ndarray, features: list[dict]) -> list: ...
    def merge_windows(self, outputs: list, enc: Encoded, aggregation: str) -> Any: ...
    def window_targets(self, outputs: Any, enc: Encoded) -> list: ...   # merge_windows inverted (distillation)

    # ---- metrics and predictions
    def default_metric(self, labels: Any) -> str: ...
    def metric_names(self, labels: Any) -> list[str]: ...
    def compute_metrics(self, outputs: Any, targets: Any, labels: Any) -> dict: ...
    def degenerate_predictions(self, metrics: dict, labels: Any) -> str | None: ...
    def predictions_frame(self, examples: Any, outputs: Any, labels: Any) -> pd.DataFrame: ...


class Exportable(Protocol):
    """What a task adds so that `tunesmith export` and `tunesmith serve` work with it (optional: a task without
    these names is refused by both with one line). Export and serve need nothing else task-specific: they
    encode, collate, run and read outputs through the Task functions above."""
    INPUT_KIND: str  # what one raw input is: "text" (a string) or "image" (an image file's bytes)

    def load_processor(self, folder: Path, cfg: Config) -> Any: ...  # the processor saved in folder, no weights


def exportable(task: Any) -> bool:
    return all(hasattr(task, n) for n in ("INPUT_KIND", "load_processor"))


# ---------------------------------------------------------------- data (every task)

def resolve_data_config(data: DataConfig) -> DataConfig:
    """Fill file paths (and columns the user left at their defaults) from a catalog dataset."""
    if data.dataset is None:
        return data
    entry = catalog.DATASETS.get(data.dataset)
    if entry is None:
        raise TunesmithError(f"data.dataset: unknown dataset '{data.dataset}' (catalog: {', '.join(catalog.DATASETS)})")
    folder = catalog.dataset_path(data.dataset)
    updates = {}
    for key, value in entry.data_defaults.items():
        if key in ("train", "validation", "test"):
            if getattr(data, key) is None:  # only an absent split: `test: false` keeps the catalog's test out
                updates[key] = str(folder / value)
        elif key not in data.model_fields_set:
            updates[key] = value
    return data.model_copy(update=updates)


def with_data(cfg: Config, data: DataConfig) -> Config:
    """The config with another data section (e.g. resolved from the catalog)."""
    return cfg.model_copy(update={"data": data})


# ---------------------------------------------------------------- hold-out and folds (every task)

def holdout(n: int, fraction: float, seed: int, classes: np.ndarray | None = None,
            groups: list | None = None, source: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: `fraction` of n held out; by group when groups are given (a group never
    on both sides), stratified by `classes` when given, keeping every class on both sides where possible."""
    if round(n * fraction) < 1 or n - round(n * fraction) < 2:
        raise TunesmithError(f"{source}: {n} examples are too few to hold out {fraction:.0%} for validation; "
                             "give data.validation or more examples")
    x = np.zeros(n)
    if groups is not None and len(set(groups)) > 1:
        if classes is not None and len(set(groups)) >= max(2, round(1 / fraction)):
            return _stratified_group_holdout(classes, groups, fraction, seed)
        return next(GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(x, groups=groups))
    if classes is not None:
        counts = np.bincount(classes)
        if counts[counts > 0].min() >= 2:
            try:
                return next(StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(x, classes))
            except ValueError:
                pass  # too few rows for every class in both parts: fall back to a plain split
    return next(ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(x))


def _stratified_group_holdout(classes: np.ndarray, groups: list, fraction: float,
                              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups held out, with every class on both sides where the groups allow it.

    A plain random choice of groups (GroupShuffleSplit) can hold out mostly one class: on 600 Rotten
    Tomatoes rows grouped by film it gave a validation split that a model scored 0.21 on. Here the
    groups are dealt into round(1 / fraction) folds with class proportions kept (StratifiedGroupKFold),
    and the fold that misses the fewest classes, then is closest to `fraction` of the rows, is held out.
    """
    n = len(classes)
    folds = StratifiedGroupKFold(n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed)
    present = set(np.unique(classes).tolist())
    best, best_score = None, None
    for train_idx, val_idx in folds.split(np.zeros(n), classes, groups):
        missing = len(present - set(classes[val_idx].tolist())) + len(present - set(classes[train_idx].tolist()))
        score = (missing, abs(len(val_idx) / n - fraction))
        if best_score is None or score < best_score:
            best, best_score = (train_idx, val_idx), score
    return best


def fold_indices(n: int, folds: int, seed: int, classes: np.ndarray | None, class_names: list[str],
                 groups: list | None, source: str) -> list[np.ndarray]:
    """The held-out indices of each of k folds (stratified by `classes`, grouped by `groups` when given);
    checks that every fold can hold out something sensible."""
    if folds > n:
        raise TunesmithError(f"{source}: {folds} folds need at least {folds} examples (found {n})")
    if classes is not None:
        counts = np.bincount(classes, minlength=len(class_names))
        low = int(np.argmin(counts))
        if counts[low] < folds:
            raise TunesmithError(f"{source}: class '{class_names[low]}' has only {counts[low]} example(s), too few "
                                 f"for {folds} folds (each fold holds out some of every class); use at most "
                                 f"{counts[low]} folds, or add examples")
    if groups is not None:
        n_groups = len(set(groups))
        if n_groups < folds:
            raise TunesmithError(f"{source}: only {n_groups} distinct groups in the group column, too few for "
                                 f"{folds} folds (a group never sits on both sides)")
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed) if classes is not None else \
            GroupKFold(folds, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed) if classes is not None else \
            KFold(folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(n), classes, groups)]


def splits_around(train_all: Any, read_examples: Callable, cfg: Config, labels: Any,
                  classes: np.ndarray | None = None) -> Splits:
    """Splits of a task's training examples: validation from data.validation or held out of train
    (split_train, stratified by `classes`), and data.test (none when absent or false), both read with the
    task's read_examples."""
    data = cfg.data
    if data.validation:
        train, validation = train_all, read_examples(data.validation, cfg, labels)
    else:
        train, validation = split_train(train_all, classes, cfg, inputs.shown(data.train))
    test = read_examples(data.test, cfg, labels) if data.test else None
    return Splits(train, validation, test, labels)


def split_train(train_all: Any, classes: np.ndarray | None, cfg: Config, source: str) -> tuple[Any, Any]:
    """(train, validation) of a task's training examples as data.validation_fraction says (none at 0),
    stratified by `classes` (the task's stratify_by) and grouped by the examples' groups."""
    if not cfg.data.holds_out:
        return train_all, None
    fraction = cfg.data.validation_share(len(train_all))
    train_idx, val_idx = holdout(len(train_all), fraction, cfg.train.seed, classes, train_all.groups, source)
    return train_all.subset(train_idx), train_all.subset(val_idx)


# ---------------------------------------------------------------- shared by classification tasks

def row_outputs(logits: np.ndarray, features: list[dict]) -> list[np.ndarray]:
    """One output row per input (sequence and image classification)."""
    return list(logits)


def row_targets(outputs: Any, enc: Encoded) -> list[np.ndarray]:
    """One example's output row per input (a chunked document's windows all get their document's row):
    the teacher's per-example outputs as soft targets of the student's inputs (sequence and image
    classification)."""
    docs = enc.doc_index if enc.doc_index is not None else range(len(enc.features))
    return [np.asarray(outputs[d], dtype=np.float32) for d in docs]


def hf_forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, loss) of a Hugging Face model; the loss is its own (None without labels in the batch)."""
    out = model(**batch)
    return out.logits, getattr(out, "loss", None)
