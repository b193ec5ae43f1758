"""Text classification: single-label, multi-label and regression, on one text or a text pair.

The functions here are the task interface the training loop calls (see tasks/__init__.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit, StratifiedGroupKFold, StratifiedShuffleSplit
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .. import catalog
from ..config import Config, DataConfig
from ..data import Table, float_values, label_names, multi_label_names, read_table, sort_labels, text_values
from ..errors import TunesmithError
from ..evaluate import multi_label_metrics, regression_metrics, single_label_metrics
from ..models import first_token_only, from_pretrained

NAME = "text_classification"
_HF_PROBLEM = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
               "regression": "regression"}


@dataclass
class LabelSpace:
    """What the model predicts; saved with the model so evaluate/predict read data the same way."""
    problem_type: str
    names: list[str] = field(default_factory=list)  # empty for regression

    @property
    def num_outputs(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.names)


@dataclass
class Examples:
    table: Table
    texts: list[str]
    pairs: list[str] | None
    targets: np.ndarray | None  # class ids, multi-hot rows, or floats; None when unlabelled
    groups: list[str] | None = None
    label_names: list[str] = field(default_factory=list)  # what the target ids index

    def subset(self, idx: np.ndarray) -> "Examples":
        pick = lambda xs: [xs[i] for i in idx] if xs is not None else None  # noqa: E731
        df = self.table.df.iloc[idx].reset_index(drop=True)
        lines = pick(self.table.line_of_row)
        return Examples(Table(df, self.table.path, lines, pick(self.table.row_names)), pick(self.texts), pick(self.pairs),
                        None if self.targets is None else self.targets[idx], pick(self.groups),
                        self.label_names)


@dataclass
class Splits:
    train: Examples
    validation: Examples | None
    test: Examples | None
    labels: LabelSpace


# ---------------------------------------------------------------- data

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
            if getattr(data, key) is None:
                updates[key] = str(folder / value)
        elif key not in data.model_fields_set:
            updates[key] = value
    return data.model_copy(update=updates)


def read_examples(path: str | Path, data: DataConfig, labels: LabelSpace | None,
                  require_labels: bool = True) -> Examples:
    """Read and check one file. With `labels` given (evaluate/predict), unknown labels are errors;
    without, the file's own labels (sorted) define the label space (see label_space)."""
    table = read_table(path)
    texts = text_values(table, data.text_column)
    pairs = text_values(table, data.text_pair_column, "text pair") if data.text_pair_column else None
    groups = None
    if data.group_column and data.group_column in table.df.columns:
        groups = [str(g) for g in table.df[data.group_column].tolist()]
    targets, names = None, []
    if require_labels or data.label_column in table.df.columns:
        targets, names = _encode_targets(table, data, labels)
    return Examples(table, texts, pairs, targets, groups, names)


def _encode_targets(table: Table, data: DataConfig, labels: LabelSpace | None) -> tuple[np.ndarray, list[str]]:
    """Targets as model outputs (ids, multi-hot rows or floats) and the label names they index."""
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


def label_space(train: Examples, data: DataConfig) -> LabelSpace:
    """The labels seen in the training file; classification needs at least two."""
    if data.problem_type == "regression":
        return LabelSpace("regression")
    names = train.label_names
    if len(names) < 2:
        shown = f" ('{names[0]}')" if names else ""
        raise TunesmithError(f"{train.table.path}: column '{data.label_column}' has only {len(names)} class{shown}; "
                             "classification needs at least two")
    return LabelSpace(data.problem_type, names)


def load_splits(cfg: Config) -> Splits:
    data = resolve_data_config(cfg.data)
    train_all = read_examples(data.train, data, None, require_labels=True)
    labels = label_space(train_all, data)
    if data.validation:
        train, validation = train_all, read_examples(data.validation, data, labels)
    elif data.validation_fraction > 0:
        train_idx, val_idx = _validation_split(train_all, data, cfg.train.seed)
        train, validation = train_all.subset(train_idx), train_all.subset(val_idx)
    else:
        train, validation = train_all, None
    test = read_examples(data.test, data, labels) if data.test else None
    return Splits(train, validation, test, labels)


def _validation_split(examples: Examples, data: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(examples.texts)
    frac = data.validation_fraction
    if round(n * frac) < 1 or n - round(n * frac) < 2:
        raise TunesmithError(f"{examples.table.path}: {n} rows are too few to hold out "
                             f"{frac:.0%} for validation; give data.validation or more rows")
    x = np.zeros(n)
    if examples.groups is not None and len(set(examples.groups)) > 1:
        if data.problem_type == "single_label" and len(set(examples.groups)) >= max(2, round(1 / frac)):
            return _stratified_group_holdout(examples, frac, seed)
        splitter = GroupShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
        return next(splitter.split(x, groups=examples.groups))
    if data.problem_type == "single_label":
        counts = np.bincount(examples.targets)
        if counts[counts > 0].min() >= 2:
            try:
                splitter = StratifiedShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
                return next(splitter.split(x, examples.targets))
            except ValueError:
                pass  # too few rows for every class in both parts: fall back to a plain split
    return next(ShuffleSplit(n_splits=1, test_size=frac, random_state=seed).split(x))


def _stratified_group_holdout(examples: Examples, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups held out, with every class on both sides where the groups allow it.

    A plain random choice of groups (GroupShuffleSplit) can hold out mostly one class: on 600 Rotten
    Tomatoes rows grouped by film it gave a validation split that a model scored 0.21 on. Here the
    groups are dealt into round(1 / frac) folds with class proportions kept (StratifiedGroupKFold),
    and the fold that misses the fewest classes, then is closest to `frac` of the rows, is held out.
    """
    n = len(examples.texts)
    folds = StratifiedGroupKFold(n_splits=max(2, round(1 / frac)), shuffle=True, random_state=seed)
    classes = set(np.unique(examples.targets).tolist())
    best, best_score = None, None
    for train_idx, val_idx in folds.split(np.zeros(n), examples.targets, examples.groups):
        missing = len(classes - set(examples.targets[val_idx].tolist())) + \
            len(classes - set(examples.targets[train_idx].tolist()))
        score = (missing, abs(len(val_idx) / n - frac))
        if best_score is None or score < best_score:
            best, best_score = (train_idx, val_idx), score
    return best


def map_words(examples: Examples, fn) -> Examples:
    """The examples with each (first) text rewritten by fn(words, None) -> (words, None), words split on
    whitespace (augmentation); a text fn leaves as it was stays exactly as written."""
    words = [t.split() for t in examples.texts]
    new, _ = fn(words, None)
    return dataclasses.replace(examples, texts=[t if w == n else " ".join(n) for t, w, n in zip(examples.texts, words, new)])


def show_examples(examples: Examples) -> list[str]:
    return list(examples.texts)


# ---------------------------------------------------------------- model

def build_model(source: str, labels: LabelSpace, cfg: Config):
    """Backbone + a fresh classification head sized for `labels`."""
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source,
                                trust_remote_code=cfg.model.trust_remote_code)
    kwargs = dict(num_labels=labels.num_outputs, problem_type=_HF_PROBLEM[labels.problem_type],
                  trust_remote_code=cfg.model.trust_remote_code)
    if labels.names:
        kwargs["id2label"] = dict(enumerate(labels.names))
        kwargs["label2id"] = {n: i for i, n in enumerate(labels.names)}
    model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, source, **kwargs)
    first_token_only(model)
    return model, tokenizer


def load_model(folder: str | Path):
    """A model this task saved (a plain Hugging Face folder), ready for evaluate/predict."""
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    first_token_only(model)
    return model


# ---------------------------------------------------------------- features

@dataclass
class Encoded:
    features: list[dict]
    lengths: list[int]
    truncated: int  # texts longer than max_length (cut to fit, or split into windows when chunking)
    doc_index: list[int] | None = None  # chunking: the example each feature (window) belongs to
    num_examples: int = 0


def encode(tokenizer, examples: Examples, max_length: int, stride: int | None = None) -> Encoded:
    """Token ids per example; with `stride` (long_text: chunk), a text longer than max_length becomes
    windows of max_length tokens, each sharing `stride` tokens with the one before (a pair's second
    text is repeated in every window)."""
    args = (examples.texts, examples.pairs) if examples.pairs else (examples.texts,)
    doc_index = None
    if stride is None:
        enc = tokenizer(*args, truncation=True, max_length=max_length)
    else:
        if not tokenizer.is_fast:
            raise TunesmithError("model.long_text: chunk needs a fast tokenizer (this model's is a slow one)")
        try:
            enc = tokenizer(*args, truncation="only_first" if examples.pairs else True, max_length=max_length,
                            stride=stride, return_overflowing_tokens=True)
        except Exception as exc:  # e.g. the pair's second text alone leaves no room for the first
            raise TunesmithError(f"{examples.table.path}: cannot split a text into windows of {max_length} tokens "
                                 f"with stride {stride} ({str(exc).splitlines()[0]})") from None
        doc_index = list(enc["overflow_to_sample_mapping"])
    ids = enc["input_ids"]
    type_ids = enc.get("token_type_ids")
    if doc_index is not None:
        truncated = int(np.sum(np.bincount(doc_index, minlength=len(examples.texts)) > 1))
    else:
        # Only texts that hit the limit can have been cut: re-tokenise those alone to count them.
        full = [i for i, x in enumerate(ids) if len(x) >= max_length]
        truncated = 0
        if full:
            sub = [[a[i] for i in full] for a in args]
            truncated = sum(len(x) > max_length for x in tokenizer(*sub, truncation=False)["input_ids"])
    features = []
    for i, input_ids in enumerate(ids):
        doc = doc_index[i] if doc_index is not None else i
        feat = {"input_ids": input_ids}
        if type_ids is not None and examples.pairs:
            feat["token_type_ids"] = type_ids[i]
        if examples.targets is not None:
            feat["labels"] = examples.targets[doc]  # every window of a document carries its label
        features.append(feat)
    return Encoded(features, [len(x) for x in ids], truncated, doc_index, len(examples.texts))


def merge_windows(logits: np.ndarray, enc: Encoded, aggregation: str = "mean") -> np.ndarray:
    """One row of logits per example: a chunked document's windows combined by mean or max."""
    if enc.doc_index is None:
        return logits
    doc = np.asarray(enc.doc_index)
    if aggregation == "max":
        out = np.full((enc.num_examples, logits.shape[1]), -np.inf, dtype=logits.dtype)
        np.maximum.at(out, doc, logits)
        return out
    out = np.zeros((enc.num_examples, logits.shape[1]), dtype=logits.dtype)
    np.add.at(out, doc, logits)
    return out / np.bincount(doc, minlength=enc.num_examples)[:, None]


def collate(features: list[dict], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding), rounded up to `multiple`."""
    width = -(-max(len(f["input_ids"]) for f in features) // multiple) * multiple
    batch = {}
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.as_tensor(f["input_ids"])
        mask[i, :n] = 1
    batch["input_ids"], batch["attention_mask"] = input_ids, mask
    if "token_type_ids" in features[0]:
        types = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            types[i, :len(f["token_type_ids"])] = torch.as_tensor(f["token_type_ids"])
        batch["token_type_ids"] = types
    if "labels" in features[0]:
        batch["labels"] = torch.as_tensor(np.stack([f["labels"] for f in features]))
    return batch


# ---------------------------------------------------------------- outputs

def default_metric(labels: LabelSpace) -> str:
    return "r2" if labels.problem_type == "regression" else "macro_f1"


def has_classes(labels: LabelSpace) -> bool:
    return labels.problem_type != "regression"


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


def predict_targets(logits: np.ndarray, labels: LabelSpace) -> np.ndarray:
    if labels.problem_type == "regression":
        return logits[:, 0]
    if labels.problem_type == "multi_label":
        return (logits > 0).astype(np.float32)  # sigmoid(x) > 0.5
    return logits.argmax(axis=1)


def compute_metrics(logits: np.ndarray, targets: np.ndarray, labels: LabelSpace) -> dict:
    pred = predict_targets(logits, labels)
    if labels.problem_type == "regression":
        return regression_metrics(targets, pred)
    if labels.problem_type == "multi_label":
        return multi_label_metrics(targets.astype(int), pred.astype(int), labels.names)
    return single_label_metrics(targets, pred, labels.names)


def predictions_frame(examples: Examples, logits: np.ndarray, labels: LabelSpace) -> pd.DataFrame:
    """The input rows plus the prediction and one probability column per class."""
    df = examples.table.df.copy()
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
