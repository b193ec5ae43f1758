"""Text classification: single-label, multi-label and regression, on one text or a text pair.

A task module: it provides every name of tasks.base.Task (the generic modules call nothing else).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification

from .. import inputs
from ..augment import augmenter_for
from ..config import Config
from ..data import Table, read_table, text_values
from ..errors import TunesmithError
from ..models import first_token_only, from_pretrained, weights_options
from ..schedule import AUTO_MIN_STEPS
from . import classes, text
from .base import Encoded, Splits, hf_forward, row_outputs, row_targets
from .classes import (LabelSpace, class_ids, compute_metrics, default_metric, degenerate_predictions,  # noqa: F401
                      has_classes, labels_from_dict, metric_names)

NAME = "text_classification"
INPUT_KIND = "text"  # serve: one raw input is a string


@dataclass
class Examples:
    table: Table
    texts: list[str]
    pairs: list[str] | None
    targets: np.ndarray | None  # class ids, multi-hot rows, or floats; None when unlabelled
    groups: list[str] | None = None
    label_names: list[str] = field(default_factory=list)  # what the target ids index

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "Examples":
        pick = lambda xs: [xs[i] for i in idx] if xs is not None else None  # noqa: E731
        df = self.table.df.iloc[idx].reset_index(drop=True)
        table = Table(df, self.table.path, pick(self.table.line_of_row), pick(self.table.row_names))
        return Examples(table, pick(self.texts), pick(self.pairs),
                        None if self.targets is None else self.targets[idx], pick(self.groups), self.label_names)


# ---------------------------------------------------------------- data

def read_examples(source, cfg: Config, labels: LabelSpace | None, require_labels: bool = True) -> Examples:
    """Read and check one file (or in-memory data). With `labels` given (evaluate/predict), unknown
    labels are errors; without, the file's own labels (sorted) define the label space. A plain list of
    strings is texts to predict."""
    if inputs.is_text_list(source):
        with inputs.in_memory_input(list(source), "texts", cfg.data.text_column) as token:
            return read_examples(token, cfg, labels, require_labels)
    data, pair_column = cfg.data, cfg.text_classification.text_pair_column
    table = read_table(source)
    texts = text_values(table, data.text_column)
    pairs = text_values(table, pair_column, "text pair") if pair_column else None
    groups = None
    if data.group_column and data.group_column in table.df.columns:
        groups = [str(g) for g in table.df[data.group_column].tolist()]
    targets, names = None, []
    if require_labels or data.label_column in table.df.columns:
        targets, names = classes.targets_from_table(table, data, labels)
    return Examples(table, texts, pairs, targets, groups, names)


def load_splits(cfg: Config) -> Splits:
    return classes.load_class_splits(cfg, read_examples)


def example_classes(targets, labels: LabelSpace) -> list[np.ndarray]:
    return classes.example_classes(targets, labels)


def stratify_by(examples: Examples, labels: LabelSpace) -> np.ndarray | None:
    return classes.stratify_by(examples.targets, labels)


def map_words(examples: Examples, fn: Callable) -> Examples:
    """The examples with each (first) text rewritten by fn(words, None) -> (words, None), words split on
    whitespace (augmentation); a text fn leaves as it was stays exactly as written."""
    words = [t.split() for t in examples.texts]
    new, _ = fn(words, None)
    return dataclasses.replace(examples, texts=[t if w == n else " ".join(n) for t, w, n in zip(examples.texts, words, new)])


def show_examples(examples: Examples) -> list[str]:
    return list(examples.texts)


# ---------------------------------------------------------------- model

def build_model(source: str, labels: LabelSpace, cfg: Config):
    """Backbone + a fresh classification head sized for `labels`; returns (model, tokenizer)."""
    tokenizer = text.load_tokenizer(source, cfg)
    kwargs = dict(num_labels=labels.num_outputs, problem_type=classes.HF_PROBLEM[labels.problem_type],
                  trust_remote_code=cfg.model.trust_remote_code,
                  **weights_options(source, cfg.model.allow_pickle))
    if labels.names:
        kwargs["id2label"] = dict(enumerate(labels.names))
        kwargs["label2id"] = {n: i for i, n in enumerate(labels.names)}
    model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, source, **kwargs)
    first_token_only(model)
    return model, tokenizer


def load_model(folder: str | Path, cfg: Config):
    """A model this task saved (a plain Hugging Face folder), ready for evaluate/predict."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    first_token_only(model)
    return model, text.load_tokenizer(folder, cfg)


def load_processor(folder: str | Path, cfg: Config):
    """The tokenizer saved beside the model (export, the ONNX backend)."""
    return text.load_tokenizer(folder, cfg)


def save_processor(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- features, loss, outputs

def encode(tokenizer, examples: Examples, cfg: Config, train: bool = False, epoch: int = 0) -> Encoded:
    """Token ids per example; with model.long_text: chunk, a text longer than max_length becomes windows
    of max_length tokens, each sharing model.stride tokens with the one before (a pair's second text is
    repeated in every window)."""
    if train and cfg.augment:  # this epoch's augmented copy, seeded by (train.seed, epoch, example)
        augmenter = augmenter_for(cfg.augment, cfg.train.seed)
        examples = map_words(examples, lambda words, tags: augmenter.augment(words, tags, epoch))
    max_length, stride = text.max_length(tokenizer, cfg), cfg.model.chunk_stride
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
    return Encoded(features, [len(x) for x in ids], truncated, doc_index, len(examples.texts), max_length=max_length)


def describe_inputs(enc: Encoded, cfg: Config) -> str:
    return text.describe_long_texts(enc, cfg)


def make_collate(tokenizer, multiple: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad to the longest sequence in the batch (dynamic padding), rounded up to `multiple`."""
    return text.collate_with(tokenizer, multiple, text.stacked_labels)


def forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, the model's loss or None): a Hugging Face model computes its loss from batch labels."""
    return hf_forward(model, batch)


def auto_lr(strategy: str, batch_size: int) -> float:
    return text.auto_lr(strategy, batch_size)


def auto_min_steps() -> int:
    return AUTO_MIN_STEPS  # 1,000 reviews: macro F1 0.776 after 300 steps of 16 (docs/defaults.md)


def cpu_bf16_needs_amx() -> bool:
    return False  # text encoders: bf16 on AMX or AVX512-BF16 CPUs


def extra_loss_weights(cfg: Config, labels: LabelSpace) -> np.ndarray | None:
    return None


def split_outputs(logits: np.ndarray, features: list[dict]) -> list:
    return row_outputs(logits, features)


def merge_windows(outputs: list, enc: Encoded, aggregation: str = "mean") -> np.ndarray:
    """One row of logits per example: a chunked document's windows combined by mean or max."""
    return classes.merge_rows(outputs, enc.doc_index, enc.num_examples, aggregation)


def window_targets(outputs, enc: Encoded) -> list[np.ndarray]:
    return row_targets(outputs, enc)


def predictions_frame(examples: Examples, logits: np.ndarray, labels: LabelSpace) -> pd.DataFrame:
    """The input rows plus the prediction and one probability column per class."""
    return classes.prediction_columns(examples.table.df, logits, labels)
