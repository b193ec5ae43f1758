"""Labels of classification tasks with one output row per example (text and image classification):
single-label, multi-label and regression targets, their metrics and prediction columns. Not a task itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import inputs
from ..config import DataConfig
from ..data import Table, float_values, label_names, multi_label_names, sort_labels
from ..errors import TunesmithError
from ..evaluate import multi_label_metrics, regression_metrics, single_label_metrics
from .base import Splits, resolve_data_config, splits_around, with_data

HF_PROBLEM = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
              "regression": "regression"}


@dataclass
class LabelSpace:
    """What the model predicts; saved with the model so evaluate/predict read data the same way."""
    problem_type: str
    names: list[str] = field(default_factory=list)  # empty for regression

    @property
    def num_outputs(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.names)


def labels_from_dict(saved: dict) -> LabelSpace:
    return LabelSpace(**saved)


def targets_from_table(table: Table, data: DataConfig, labels: LabelSpace | None) -> tuple[np.ndarray, list[str]]:
    """Targets as model outputs (class ids, multi-hot rows or floats) and the label names they index.
    With `labels` (evaluate/predict), a label not seen in training is an error naming its row."""
    col = data.label_column
    if data.problem_type == "regression":
        return np.asarray(float_values(table, col), dtype=np.float32), []
    if data.problem_type == "multi_label":
        rows = multi_label_names(table, col, data.label_separator)
        names = labels.names if labels else sort_labels({n for r in rows for n in r})
    else:
        rows = [[v] for v in label_names(table, col)]
        names = labels.names if labels else sort_labels({r[0] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    for i, row in enumerate(rows):
        for n in row:
            if n not in index:
                raise TunesmithError(f"{table.where(i, col)}: label '{n}' was not seen in training "
                                     f"(known: {', '.join(names)})")
    if data.problem_type == "single_label":
        return np.asarray([index[r[0]] for r in rows], dtype=np.int64), names
    multi_hot = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, row in enumerate(rows):
        multi_hot[i, [index[n] for n in row]] = 1.0
    return multi_hot, names


def label_space(names: list[str], data: DataConfig, source: str) -> LabelSpace:
    """The labels seen in the training data; classification needs at least two."""
    if data.problem_type == "regression":
        return LabelSpace("regression")
    if len(names) < 2:
        shown = f" ('{names[0]}')" if names else ""
        raise TunesmithError(f"{source}: column '{data.label_column}' has only {len(names)} class{shown}; "
                             "classification needs at least two")
    return LabelSpace(data.problem_type, names)


def load_class_splits(cfg, read_examples) -> Splits:
    """Train (its labels define the label space), validation (a file, or held out of train, stratified by
    class and grouped by data.group_column) and test, read with the task's read_examples."""
    cfg = with_data(cfg, resolve_data_config(cfg.data))
    data = cfg.data
    train_all = read_examples(data.train, cfg, None, require_labels=True)
    labels = label_space(train_all.label_names, data, inputs.shown(data.train))
    return splits_around(train_all, read_examples, cfg, labels, stratify_by(train_all.targets, labels))


# ---------------------------------------------------------------- what generic code asks about classes

def has_classes(labels: LabelSpace) -> bool:
    return labels.problem_type != "regression"


def example_classes(targets: np.ndarray, labels: LabelSpace) -> list[np.ndarray]:
    """The class ids each example holds (one for single-label, any number for multi-label)."""
    if labels.problem_type == "single_label":
        return [np.asarray([t]) for t in np.asarray(targets)]
    if labels.problem_type == "multi_label":
        return [np.flatnonzero(row) for row in np.asarray(targets)]
    return [np.zeros(0, np.int64) for _ in range(len(targets))]


def class_ids(name: str, labels: LabelSpace) -> list[int]:
    return [labels.names.index(name)] if name in labels.names else []


def stratify_by(targets: np.ndarray | None, labels: LabelSpace) -> np.ndarray | None:
    """Class id per example to stratify splits by (single-label only)."""
    return np.asarray(targets) if labels.problem_type == "single_label" and targets is not None else None


def metric_names(labels: LabelSpace) -> list[str]:
    if labels.problem_type == "regression":
        return ["mse", "mae", "r2", "spearman"]
    if labels.problem_type == "multi_label":
        return ["subset_accuracy", "micro_precision", "micro_recall", "micro_f1", "macro_precision",
                "macro_recall", "macro_f1"]
    return ["accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall",
            "weighted_f1"]


def default_metric(labels: LabelSpace) -> str:
    return "r2" if labels.problem_type == "regression" else "macro_f1"


def degenerate_predictions(metrics: dict, labels: LabelSpace) -> str | None:
    """How the predictions show that nothing was learned ("predicts only 'fresh'"), or None."""
    if labels.problem_type == "single_label":
        matrix = np.asarray(metrics["confusion_matrix"])  # rows: true class, columns: predicted class
        predicted, present = matrix.sum(axis=0), matrix.sum(axis=1)
        if (present > 0).sum() > 1 and (predicted > 0).sum() == 1:
            return f"predicts only '{labels.names[int(predicted.argmax())]}'"
    if labels.problem_type == "multi_label" and metrics["micro_recall"] == 0.0:
        return "predicts no label"
    return None


# ---------------------------------------------------------------- outputs

def predict_targets(logits: np.ndarray, labels: LabelSpace) -> np.ndarray:
    if labels.problem_type == "regression":
        return logits[:, 0]
    if labels.problem_type == "multi_label":
        return (logits > 0).astype(np.float32)  # sigmoid(x) > 0.5
    return logits.argmax(axis=1)


def compute_metrics(logits: np.ndarray, targets: np.ndarray, labels: LabelSpace) -> dict:
    logits = np.asarray(logits)
    pred = predict_targets(logits, labels)
    if labels.problem_type == "regression":
        return regression_metrics(targets, pred)
    if labels.problem_type == "multi_label":
        return multi_label_metrics(targets.astype(int), pred.astype(int), labels.names)
    return single_label_metrics(targets, pred, labels.names)


def prediction_columns(df: pd.DataFrame, logits: np.ndarray, labels: LabelSpace) -> pd.DataFrame:
    """The rows plus the prediction and one probability column per class."""
    df = df.copy()
    logits = np.asarray(logits)
    pred = predict_targets(logits, labels)
    if labels.problem_type == "regression":
        df["prediction"] = pred
        return df
    if labels.problem_type == "multi_label":
        probs = 1.0 / (1.0 + np.exp(-logits))
        df["predicted_labels"] = ["|".join(n for n, on in zip(labels.names, row) if on) for row in pred]
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        df["predicted_label"] = [labels.names[i] for i in pred]
    for j, name in enumerate(labels.names):
        df[f"prob_{name}"] = np.round(probs[:, j], 6)
    return df


def merge_rows(outputs: list, doc_index: list[int] | None, num_examples: int, aggregation: str) -> np.ndarray:
    """One row of logits per example: the rows of an example's windows combined by mean or max."""
    logits = np.stack(outputs) if len(outputs) else np.zeros((0, 0), np.float32)
    if doc_index is None:
        return logits
    doc = np.asarray(doc_index)
    if aggregation == "max":
        out = np.full((num_examples, logits.shape[1]), -np.inf, dtype=logits.dtype)
        np.maximum.at(out, doc, logits)
        return out
    out = np.zeros((num_examples, logits.shape[1]), dtype=logits.dtype)
    np.add.at(out, doc, logits)
    return out / np.bincount(doc, minlength=num_examples)[:, None]
