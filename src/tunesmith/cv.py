"""Cross-validation: k training runs, each scored on the one fold it never saw.

The training data (the train file, or the catalog's train split) is cut into k folds: stratified by
class for single-label data, and by group (e.g. film) when data.group_column is set, so a group
never sits on both sides. Inside a fold, the best checkpoint is picked on a validation part carved
out of the fold's *training* rows (again by group), never on the held-out fold: picking on the fold
you report would inflate the score. The test split is not used to choose anything; with
cv.keep_models it is scored once, by the ensemble of the fold models.

    cv_dir/
      cv.json              per-fold metrics, mean and std of every metric, pooled out-of-fold metrics
      oof_predictions.csv  every training row with its fold and its out-of-fold prediction (.jsonl for NER)
      test_predictions.csv ensemble predictions on the test split (cv.keep_models only)
      fold-1/ ...          each fold's run folder (config, metrics; model/ with cv.keep_models)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import distributed, inputs
from .atomic import write_text_atomic
from .config import Config, load_config
from .errors import TunesmithError
from .evaluate import scalar_metrics
from .inference import CV_INFO, CVEnsemble, write_frame_atomic
from .tasks import TASKS
from .runlog import log
from .tasks.base import Splits, resolve_data_config, split_train
from .tasks.base import fold_indices as base_fold_indices
from .train import new_run_dir, publish, train



@dataclass
class CVResult:
    cv_dir: Path
    folds: list[dict]           # scalar metrics of each held-out fold
    mean: dict[str, float]
    std: dict[str, float]       # sample standard deviation across folds (ddof=1)
    pooled: dict                # metrics of all out-of-fold predictions together
    test_metrics: dict | None   # the fold models' ensemble on the test split (keep_models only)


def fold_indices(task, examples, labels, folds: int, seed: int, source: str) -> list[np.ndarray]:
    """The held-out example indices of each fold: stratified where the task can stratify, by group when
    the data has groups; checks that every fold can hold out something sensible."""
    return base_fold_indices(len(examples), folds, seed, task.stratify_by(examples, labels),
                             getattr(labels, "names", []), examples.groups, source)


def _train_fold(i: int, cfg: Config, task, base: Splits, held: np.ndarray, held_rows, inner_fraction: bool,
                cv_dir: Path):
    """Train on every row outside fold i (less its validation part) and test on fold i."""
    rows = base.train
    fold_train, validation = rows.subset(np.setdiff1d(np.arange(len(rows)), held)), base.validation
    if inner_fraction:  # validation out of the fold's training part, split the way train() would split it
        fold_train, validation = split_train(fold_train, task.stratify_by(fold_train, base.labels), cfg,
                                             f"fold {i}")
    log(f"fold {i}/{cfg.cv.folds}: {len(fold_train)} train, "
        f"{len(validation) if validation is not None else 0} validation, {len(held)} held out")
    splits = Splits(fold_train, validation, held_rows, base.labels)
    # false, not None: a catalog dataset's test split must not come back when a fold's config is read again
    fold_cfg = load_config(cfg, {"output.dir": str(cv_dir), "output.name": f"fold-{i}", "data.test": False})
    result = train(fold_cfg, splits=splits)
    shutil.rmtree(result.run_dir / "checkpoints", ignore_errors=True)  # the fold is done: no resume needed
    if not cfg.cv.keep_models:
        shutil.rmtree(result.run_dir / "model", ignore_errors=True)
    return result


def cross_validate(config: str | Path | dict | Config, overrides: dict[str, Any] | None = None, *,
                   folds: int | None = None, keep_models: bool | None = None, cv_dir: str | Path | None = None,
                   on_fold: Callable[[int, float], bool] | None = None) -> CVResult:
    """k-fold cross-validation of the config; `folds`/`keep_models` override cv.folds/cv.keep_models.

    `on_fold(fold, mean_so_far)` (hyperparameter search) sees the mean of train.metric after each
    fold and may return True to stop early; the result then covers the folds run so far.
    """
    distributed.one_process_only("cv")
    with inputs.in_memory_data(config, overrides) as (config, overrides):
        return _cross_validate(config, overrides, folds, keep_models, cv_dir, on_fold)


def _cross_validate(config, overrides, folds, keep_models, cv_dir, on_fold) -> CVResult:
    extra = dict(overrides or {})
    if folds is not None:
        extra["cv.folds"] = folds
    if keep_models is not None:
        extra["cv.keep_models"] = keep_models
    cfg = load_config(config, extra)
    k, task = cfg.cv.folds, TASKS[cfg.task]
    data = resolve_data_config(cfg.data)

    # ---- every input check before anything is written
    # All training rows; a validation *file* (if any) picks checkpoints in every fold.
    base = task.load_splits(load_config(cfg, {"data.validation_fraction": 0.0}))
    rows = base.train
    held_out = fold_indices(task, rows, base.labels, k, cfg.train.seed, inputs.shown(data.train))
    inner_fraction = base.validation is None and data.holds_out
    metric = task.default_metric(base.labels) if cfg.train.metric == "auto" else cfg.train.metric

    cv_dir = _new_cv_dir(cfg, cv_dir)
    created = new_folder(cv_dir)
    cfg = inputs.persist(cfg, cv_dir)  # in-memory data: one copy for every fold's config
    selection = "validation file" if base.validation is not None else \
        "validation part of each fold's training rows" if inner_fraction else "last step"
    stratified = task.stratify_by(rows, base.labels) is not None
    log(f"cross-validation: {k} folds of {len(rows)} examples ({'by group, ' if rows.groups is not None else ''}"
        f"{'stratified' if stratified else 'not stratified'}); "
        f"best checkpoint by validation {metric} on the {selection}; folder {cv_dir}")
    fold_metrics, outputs, frames = _run_folds(cfg, task, base, held_out, inner_fraction, cv_dir, metric, on_fold,
                                               created)

    # ---- summary
    keys = [m for m in fold_metrics[0] if all(m in f for f in fold_metrics)]
    mean = {m: float(np.mean([f[m] for f in fold_metrics])) for m in keys}
    std = {m: float(np.std([f[m] for f in fold_metrics], ddof=1)) if len(fold_metrics) > 1 else float("nan")
           for m in keys}
    done = np.sort(np.concatenate(held_out[:len(fold_metrics)]))
    oof = pd.concat(frames, ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)
    oof_path = cv_dir / ("oof_predictions.jsonl" if _has_lists(oof) else "oof_predictions.csv")
    write_frame_atomic(oof, oof_path)
    pooled = task.compute_metrics([outputs[r] for r in done], rows.subset(done).targets, base.labels)
    test_metrics = None
    if cfg.cv.keep_models and base.test is not None and len(fold_metrics) == k:
        test_metrics = _score_ensemble(task, base, cv_dir, k)
    summary = {"folds": k, "folds_run": len(fold_metrics), "metric": metric, "examples": len(rows),
               "grouped": rows.groups is not None, "stratified": stratified, "checkpoint_selection": selection,
               "std": "sample standard deviation across folds (ddof=1)",
               "per_fold": fold_metrics, "mean": mean, "std_dev": std, "pooled_out_of_fold": pooled,
               "keep_models": cfg.cv.keep_models, "test_ensemble": test_metrics,
               "predictions": oof_path.name}
    write_text_atomic(cv_dir / CV_INFO, json.dumps(summary, indent=1))
    if on_fold is None:  # a search's cv trial is shown in the search's report
        publish(cv_dir, cfg)
    return CVResult(cv_dir, fold_metrics, mean, std, pooled, test_metrics)


def _new_cv_dir(cfg: Config, cv_dir: str | Path | None) -> Path:
    if cv_dir is None:
        stem = cfg.data.dataset or inputs.stem(cfg.data.train)
        name = cfg.output.name or f"{stem}-cv-{time.strftime('%Y%m%d-%H%M%S')}"
        cv_dir = new_run_dir(load_config(cfg, {"output.name": name}))
    cv_dir = Path(cv_dir)
    if cv_dir.exists():
        raise TunesmithError(f"{cv_dir}: already exists; choose another output.name")
    return cv_dir


def _run_folds(cfg: Config, task, base: Splits, held_out: list[np.ndarray], inner_fraction: bool, cv_dir: Path,
               metric: str, on_fold, created: Path) -> tuple[list[dict], list, list[pd.DataFrame]]:
    """Train and score every fold; returns each fold's metrics, every row's out-of-fold output, and the
    prediction frames."""
    rows, k = base.train, len(held_out)
    fold_metrics: list[dict] = []
    outputs: list = [None] * len(rows)
    frames: list[pd.DataFrame] = []
    for i, held in enumerate(held_out, start=1):
        held_rows = rows.subset(held)
        try:
            result = _train_fold(i, cfg, task, base, held, held_rows, inner_fraction, cv_dir)
        except TunesmithError:
            if not fold_metrics:  # a bad setting surfaced in the first fold: leave nothing behind
                shutil.rmtree(created, ignore_errors=True)
            raise
        scores = scalar_metrics(result.metrics)
        fold_metrics.append(scores)
        for j, row in enumerate(held):
            outputs[row] = result.test_logits[j]
        frame = task.predictions_frame(held_rows, result.test_logits, base.labels)
        frame.insert(0, "fold", i)
        frame.insert(0, "row", held + 1)  # 1-based position in the training data
        frames.append(frame)
        mean_so_far = float(np.mean([m[metric] for m in fold_metrics])) if metric in scores else float("nan")
        log(f"fold {i}/{k}: held-out {', '.join(f'{m} {v:.4f}' for m, v in scores.items())}")
        if on_fold is not None and on_fold(i, mean_so_far):
            log(f"stopped after fold {i}/{k}")
            break
    return fold_metrics, outputs, frames


def _score_ensemble(task, base: Splits, cv_dir: Path, k: int) -> dict:
    """The fold models' ensemble on the test split (cv.keep_models)."""
    ensemble = CVEnsemble(cv_dir, fold_dirs=[cv_dir / f"fold-{i}" for i in range(1, k + 1)])
    logits = ensemble.logits(base.test)
    metrics = task.compute_metrics(logits, base.test.targets, base.labels)
    write_frame_atomic(task.predictions_frame(base.test, logits, base.labels), cv_dir / "test_predictions.csv")
    log(f"test ({len(base.test)} examples), ensemble of {k} fold models: "
        + ", ".join(f"{m} {v:.4f}" for m, v in scalar_metrics(metrics).items()))
    return metrics


def _has_lists(frame: pd.DataFrame) -> bool:
    """Columns holding lists or dicts (tags per word, entities) do not fit a CSV: JSONL then."""
    return any(isinstance(v, (list, dict, np.ndarray)) for c in frame.columns for v in frame[c].head(5))


def new_folder(path: Path, exist_ok: bool = False) -> Path | None:
    """Create `path` (and missing parents); returns the topmost folder created, to remove on failure.

    With exist_ok, a folder that exists already (made a moment ago by another worker of the same
    search, say) is no error: None is returned, as nothing was created here.
    """
    top = path
    while not top.parent.exists():
        top = top.parent
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        if not exist_ok:
            raise
        return None
    return top


def format_cv_table(result: CVResult) -> str:
    """Per-fold table, then mean ± std of every metric and the pooled out-of-fold figure."""
    keys = list(result.mean)
    width = max(len(m) for m in keys)
    lines = [f"{'fold':>4}  " + "  ".join(f"{m:>{max(9, len(m))}}" for m in keys)]
    for i, f in enumerate(result.folds, start=1):
        lines.append(f"{i:>4}  " + "  ".join(f"{f[m]:>{max(9, len(m))}.4f}" for m in keys))
    lines.append("")
    pooled = scalar_metrics(result.pooled)
    lines.append(f"{'metric':<{width}}  {'mean ± std':>15}  {'pooled':>7}")
    for m in keys:
        shown = f"{pooled[m]:.4f}" if m in pooled else ""
        lines.append(f"{m:<{width}}  {result.mean[m]:.4f} ± {result.std[m]:.4f}  {shown:>7}")
    if result.test_metrics:
        lines.append("")
        lines.append("test, ensemble of the fold models: " + ", ".join(
            f"{m} {v:.4f}" for m, v in scalar_metrics(result.test_metrics).items()))
    return "\n".join(lines)
