"""Token classification (named-entity recognition): one tag per word, entity-level scores.

A task module: it provides every name of tasks.base.Task (the generic modules call nothing else).
Tags in any scheme (IO, BIO, IOB1, BIOES) are read into entity spans and the model learns BIO
tags; its word-level outputs are decoded under the BIO rules and written back in the data's scheme.
Words are split into sub-tokens by a fast tokenizer: the first sub-token of a word carries its
label (or every sub-token, with token_classification.label_all_subtokens) and predicts it.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForTokenClassification

from .. import inputs
from .. import tags as tagging
from ..augment import augmenter_for
from ..config import Config
from ..errors import TunesmithError
from ..models import from_pretrained, weights_options
from ..token_data import Sentences, read_sentences
from . import text
from .base import IGNORE, Encoded, Splits, hf_forward, resolve_data_config, splits_around, with_data

NAME = "token_classification"
INPUT_KIND = "text"  # serve: one raw input is a string (entities come back with character offsets)


@dataclass
class LabelSpace:
    """The BIO tags the model predicts and the scheme of the training data (predictions use it)."""
    problem_type: str
    names: list[str]
    scheme: str = "BIO"

    @property
    def num_outputs(self) -> int:
        return len(self.names)

    @property
    def types(self) -> list[str]:
        return sorted({n[2:] for n in self.names if n != "O"})


def labels_from_dict(saved: dict) -> LabelSpace:
    return LabelSpace(**saved)


@dataclass
class Examples:
    sentences: Sentences
    tags: list[list[str]] | None      # BIO, one per word
    targets: list[np.ndarray] | None  # tag ids, one per word; None when unlabelled
    label_all_subtokens: bool = False
    scheme: str = "BIO"               # the tag scheme the file was read in
    groups = None                     # sentences are not grouped

    @property
    def texts(self) -> list[list[str]]:
        """The words of each sentence."""
        return self.sentences.tokens

    def __len__(self) -> int:
        return len(self.sentences.tokens)

    def subset(self, idx: np.ndarray) -> "Examples":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Examples(self.sentences.subset(idx), pick(self.tags), pick(self.targets), self.label_all_subtokens,
                        self.scheme)


# ---------------------------------------------------------------- data

def _bio_tags(sents: Sentences, repair: bool, scheme: str) -> list[list[str]]:
    """Check every tag against the scheme and rewrite it as BIO; errors name the line."""
    # every tag well formed first: counting the problems of the later sentences below reads all their tags
    for i, tags in enumerate(sents.tags):
        for j, tag in enumerate(tags):
            try:
                tagging.split_tag(tag)
            except ValueError as exc:
                raise TunesmithError(f"{sents.where(i, j)}: {exc}") from None
    out = []
    for i, tags in enumerate(sents.tags):
        spans, problems = tagging.to_spans(tags, scheme)
        if problems and not repair:
            j, message = problems[0]
            more = sum(len(tagging.to_spans(t, scheme)[1]) for t in sents.tags[i:]) - 1
            raise TunesmithError(f"{sents.where(i, j)}: {message}"
                                 + (f" (and {more} more)" if more > 0 else "")
                                 + "; fix the file or set token_classification.repair_tags: true to read such tags "
                                 "as entity starts")
        out.append(tagging.from_spans(spans, len(tags), "BIO"))
    return out


def read_examples(source, cfg: Config, labels: LabelSpace | None, require_labels: bool = True) -> Examples:
    """Read and check one file (or in-memory records). With `labels` given (evaluate/predict), unknown
    tags are errors. A plain list of strings is raw texts to predict."""
    if inputs.is_text_list(source):
        with inputs.in_memory_input(list(source), "texts", cfg.data.text_column) as token:
            return read_examples(token, cfg, labels, require_labels)
    opts = cfg.token_classification
    sents = read_sentences(source, opts.format, opts.tokens_column, opts.tags_column, cfg.data.text_column,
                           require_tags=require_labels)
    if sents.tags is None:
        return Examples(sents, None, None, opts.label_all_subtokens)
    scheme = labels.scheme if labels else opts.tag_scheme
    if scheme == "auto":
        try:
            scheme = tagging.detect_scheme(sents.tags)
        except ValueError:
            scheme = "BIO"  # _bio_tags reports the bad tag with its line
    bio = _bio_tags(sents, opts.repair_tags, scheme)
    targets = None
    if labels is not None:
        index = {n: k for k, n in enumerate(labels.names)}
        for i, tags in enumerate(bio):
            for j, tag in enumerate(tags):
                if tag not in index:
                    raise TunesmithError(f"{sents.where(i, j)}: entity type '{tag[2:]}' was not seen in "
                                         f"training (known: {', '.join(labels.types)})")
        targets = [np.asarray([index[t] for t in tags], dtype=np.int64) for tags in bio]
    return Examples(sents, bio, targets, opts.label_all_subtokens, scheme)


def load_splits(cfg: Config) -> Splits:
    cfg = with_data(cfg, resolve_data_config(cfg.data))
    data = cfg.data
    train_all = read_examples(data.train, cfg, None, require_labels=True)
    types = {t[2:] for tags in train_all.tags for t in tags if t != "O"}
    if not types:
        raise TunesmithError(f"{inputs.shown(data.train)}: every tag is 'O'; token classification needs tagged entities")
    labels = LabelSpace(NAME, tagging.bio_names(types), train_all.scheme)
    index = {n: k for k, n in enumerate(labels.names)}
    train_all.targets = [np.asarray([index[t] for t in tags], dtype=np.int64) for tags in train_all.tags]
    return splits_around(train_all, read_examples, cfg, labels)


def has_classes(labels: LabelSpace) -> bool:
    return True


def example_classes(targets, labels: LabelSpace) -> list[np.ndarray]:
    """The tag of every word of each sentence (class counts are words per tag)."""
    return [np.asarray(t, dtype=np.int64) for t in targets]


def class_ids(name: str, labels: LabelSpace) -> list[int]:
    """A tag by name ('O', 'B-person'), or an entity type ('person': its B- and I- tags)."""
    if name in labels.names:
        return [labels.names.index(name)]
    return [i for i, n in enumerate(labels.names) if n[:2] in ("B-", "I-") and n[2:] == name]


def stratify_by(examples: Examples, labels: LabelSpace) -> None:
    return None  # a sentence holds many tags: plain random splits


def metric_names(labels: LabelSpace) -> list[str]:
    return ["f1", "precision", "recall", "token_accuracy"]


def map_words(examples: Examples, fn) -> Examples:
    """The examples with words and BIO tags rewritten by fn(words, tags) -> (words, tags) (augmentation:
    it keeps tags aligned); the result is for encoding only (no source lines or raw texts)."""
    words, tags = fn(examples.texts, examples.tags)
    index = {"O": 0}  # bio_names puts O first; every other tag fn returns comes from the same sentence
    index.update((t, int(k)) for ts, ks in zip(examples.tags, examples.targets) for t, k in zip(ts, ks))
    targets = [np.asarray([index[t] for t in ts], dtype=np.int64) for ts in tags]
    lines = [[ls[0] if ls else 0] * len(w) for ls, w in zip(examples.sentences.lines, words)]
    sents = dataclasses.replace(examples.sentences, tokens=words, tags=tags, lines=lines, texts=None, offsets=None)
    return dataclasses.replace(examples, sentences=sents, tags=tags, targets=targets, scheme="BIO")


def show_examples(examples: Examples) -> list[str]:
    """Words, an entity word followed by /its tag."""
    return [" ".join(w if t == "O" else f"{w}/{t}" for w, t in zip(ws, ts))
            for ws, ts in zip(examples.texts, examples.tags)]


# ---------------------------------------------------------------- model

def build_model(source: str, labels: LabelSpace, cfg: Config):
    """Backbone + a fresh token-classification head sized for the BIO tags; returns (model, tokenizer)."""
    tokenizer = text.load_tokenizer(source, cfg, need_fast="token classification (it maps sub-tokens to words)")
    model = from_pretrained(AutoModelForTokenClassification.from_pretrained, source, num_labels=len(labels.names),
                            id2label=dict(enumerate(labels.names)),
                            label2id={n: k for k, n in enumerate(labels.names)},
                            trust_remote_code=cfg.model.trust_remote_code,
                            **weights_options(source, cfg.model.allow_pickle))
    return model, tokenizer


def load_model(folder: str | Path, cfg: Config):
    """A model this task saved (a plain Hugging Face folder), ready for evaluate/predict."""
    return AutoModelForTokenClassification.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code), text.load_tokenizer(folder, cfg)


def load_processor(folder: str | Path, cfg: Config):
    """The tokenizer saved beside the model (export, the ONNX backend)."""
    return text.load_tokenizer(folder, cfg, need_fast="token classification (it maps sub-tokens to words)")


def save_processor(tokenizer, folder: Path) -> None:
    tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- features

def encode(tokenizer, examples: Examples, cfg: Config, train: bool = False, epoch: int = 0) -> Encoded:
    """Sub-token ids per sentence; labels on first sub-tokens. A sentence longer than max_length is
    truncated, or with model.long_text: chunk split into overlapping windows (see _windows)."""
    if train and cfg.augment:  # this epoch's augmented copy, seeded by (train.seed, epoch, example)
        augmenter = augmenter_for(cfg.augment, cfg.train.seed)
        examples = map_words(examples, lambda words, tags: augmenter.augment(words, tags, epoch))
    max_length, stride = text.max_length(tokenizer, cfg), cfg.model.chunk_stride
    words = examples.texts
    enc = tokenizer(words, is_split_into_words=True, truncation=False)
    features, lengths, doc_index, truncated, dropped = [], [], [], 0, 0
    for i, ids in enumerate(enc["input_ids"]):
        word_ids = enc.word_ids(i)
        missing = set(range(len(words[i]))) - set(w for w in word_ids if w is not None)
        if missing:  # a word the tokenizer drops entirely (e.g. a lone U+FE0F): read it as [UNK]
            fixed = [tokenizer.unk_token if k in missing else w for k, w in enumerate(words[i])]
            one = tokenizer(fixed, is_split_into_words=True, truncation=False)
            ids, word_ids = one["input_ids"], one.word_ids()
        labels = None
        if examples.targets is not None:
            labels = _labels(word_ids, examples.targets[i], examples.label_all_subtokens)
        if len(ids) > max_length and stride is not None:
            truncated += 1
            windows = _windows(ids, word_ids, labels, max_length, stride)
        else:
            if len(ids) > max_length:
                ids, word_ids = _truncate(ids, word_ids, max_length)
                labels = None if labels is None else _labels(word_ids, examples.targets[i],
                                                             examples.label_all_subtokens)
                truncated += 1
            firsts = _first_positions(word_ids)
            dropped += len(words[i]) - len(firsts)
            feat = {"input_ids": ids, "output_positions": firsts}
            if labels is not None:
                feat["labels"] = labels
            windows = [feat]
        for feat in windows:
            features.append(feat)
            lengths.append(len(feat["input_ids"]))
            doc_index.append(i)
    return Encoded(features, lengths, truncated, doc_index if stride is not None else None, len(words), dropped,
                   max_length)


def describe_inputs(enc: Encoded, cfg: Config) -> str:
    return text.describe_long_texts(enc, cfg)


def _windows(ids: list[int], word_ids: list[int | None], labels: list[int] | None, max_length: int,
             stride: int) -> list[dict]:
    """Overlapping windows of max_length tokens (special tokens repeated at both ends), each sharing
    `stride` body tokens with the one before. Every window trains on all the words it holds; for
    prediction each word is read from the one window where it has the most context on both sides
    (its `output_positions`, with the word numbers in `output_words`)."""
    head, tail = _special_ends(word_ids)
    body_end = len(ids) - tail
    n, room = body_end - head, max_length - head - tail
    if room <= stride:
        raise TunesmithError(f"model.stride {stride} leaves no room for new tokens in windows of {max_length}")
    spans, start = [], 0
    while True:
        spans.append((start, min(start + room, n)))
        if start + room >= n:
            break
        start += room - stride
    owner = {}  # body position of a word's first sub-token -> the window where it has the most context
    for pos in _first_positions(word_ids):
        p = pos - head
        owner[p] = max(range(len(spans)), key=lambda k: (min(p - spans[k][0], spans[k][1] - 1 - p), -k)
                       if spans[k][0] <= p < spans[k][1] else (-1, -k))
    windows = []
    for k, (a, b) in enumerate(spans):
        mine = [p for p in sorted(owner) if owner[p] == k]
        feat = {"input_ids": ids[:head] + ids[head + a:head + b] + ids[body_end:],
                "output_positions": [head + p - a for p in mine],
                "output_words": [word_ids[head + p] for p in mine]}
        if labels is not None:
            feat["labels"] = [IGNORE] * head + labels[head + a:head + b] + [IGNORE] * tail
        windows.append(feat)
    return windows


def split_outputs(logits: np.ndarray, features: list[dict]) -> list[np.ndarray]:
    """Each input's (positions, tags) logits at its feature's output_positions (the first sub-token of
    each word), without padding."""
    return [row[list(f.get("output_positions", range(len(f["input_ids"]))))] for row, f in zip(logits, features)]


def merge_windows(logits: list[np.ndarray], enc: Encoded, aggregation: str = "mean") -> list[np.ndarray]:
    """One (words, tags) array per sentence: each word's logits from the window that owns it.
    (`aggregation` is for classification; NER stitches windows instead of averaging them.)"""
    if enc.doc_index is None:
        return logits
    parts: list[list[tuple[list[int], np.ndarray]]] = [[] for _ in range(enc.num_examples)]
    for feat, lg, doc in zip(enc.features, logits, enc.doc_index):
        parts[doc].append((feat.get("output_words", range(len(lg))), lg))
    merged = []
    for items in parts:
        word_numbers = np.concatenate([np.asarray(list(w), dtype=np.int64) for w, _ in items])
        rows = np.concatenate([lg for _, lg in items])
        merged.append(rows[np.argsort(word_numbers, kind="stable")])
    return merged


def window_targets(outputs: list[np.ndarray], enc: Encoded) -> list[np.ndarray]:
    """merge_windows inverted: each input's (positions, tags) rows of its sentence's per-word outputs, in the
    order of its output_positions. Words are matched by their number in the sentence, so a teacher with
    another tokenizer lines up word for word; a word the outputs do not reach (the teacher's max_length cut
    it) gets a NaN row (no soft target)."""
    docs = enc.doc_index if enc.doc_index is not None else range(len(enc.features))
    targets = []
    for feat, doc in zip(enc.features, docs):
        words = np.asarray(list(feat.get("output_words", range(len(feat["output_positions"])))), dtype=np.int64)
        sentence = np.asarray(outputs[doc], dtype=np.float32)
        rows = np.full((len(words), sentence.shape[-1]), np.nan, dtype=np.float32)
        reached = words < len(sentence)
        rows[reached] = sentence[words[reached]]
        targets.append(rows)
    return targets


def _truncate(ids: list[int], word_ids: list[int | None], max_length: int) -> tuple[list[int], list[int | None]]:
    """Keep the special tokens at both ends and the first sub-tokens up to max_length.

    A word cut in the middle keeps its first sub-token, so it is still predicted; words that start
    past the limit get no position (predicted O, counted in Encoded.dropped_words).
    """
    head, tail = _special_ends(word_ids)
    keep = max_length - head - tail
    body_end = len(ids) - tail
    return (ids[:head + keep] + ids[body_end:], word_ids[:head + keep] + word_ids[body_end:])


def _special_ends(word_ids: list[int | None]) -> tuple[int, int]:
    """How many special tokens ([CLS], [SEP]...) open and close the sequence."""
    head = 0
    while head < len(word_ids) and word_ids[head] is None:
        head += 1
    tail = 0
    while tail < len(word_ids) - head and word_ids[len(word_ids) - 1 - tail] is None:
        tail += 1
    return head, tail


def _first_positions(word_ids: list[int | None]) -> list[int]:
    firsts, prev = [], None
    for pos, w in enumerate(word_ids):
        if w is not None and w != prev:
            firsts.append(pos)
        prev = w
    return firsts


def _labels(word_ids: list[int | None], targets: np.ndarray, all_subtokens: bool) -> list[int]:
    """The word's tag on its first sub-token; the others are ignored (or, with all_subtokens,
    continue the word: a B-X word's later sub-tokens are I-X)."""
    out, prev = [], None
    for w in word_ids:
        if w is None:
            out.append(IGNORE)
        elif w != prev:
            out.append(int(targets[w]))
        elif all_subtokens:
            out.append(_inside_id(int(targets[w])))
        else:
            out.append(IGNORE)
        prev = w
    return out


def _inside_id(tag_id: int) -> int:
    """bio_names orders tags O, B-t1, I-t1, B-t2, ...: a B- (odd id) continues as the I- after it."""
    return tag_id + 1 if tag_id % 2 == 1 else tag_id


def make_collate(tokenizer, multiple: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad to the longest sequence in the batch (rounded up to `multiple`); padded labels are ignored."""
    return text.collate_with(tokenizer, multiple, _padded_labels)


def _padded_labels(features: list[dict], input_ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full(input_ids.shape, IGNORE, dtype=torch.long)
    for i, f in enumerate(features):
        labels[i, :len(f["labels"])] = torch.as_tensor(f["labels"])
    return labels


def forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, the model's loss or None): a Hugging Face model computes its loss from batch labels."""
    return hf_forward(model, batch)


# Tagging every word learns slower than one label per text: on the wnut tweets (1,917 train) 300 steps of
# 16 at 5e-5 reached entity F1 0.29, at 1e-4 0.42, 600 steps at 1e-4 0.54 (docs/defaults.md). Measured for
# full fine-tuning; freeze and gradual_unfreeze train the same kind of weights and take its rate.
AUTO_LR = {**text.AUTO_LR, "full": 1e-4, "freeze": 1e-4, "gradual_unfreeze": 1e-4}
AUTO_MIN_STEPS = 600


def auto_lr(strategy: str, batch_size: int) -> float:
    return AUTO_LR[strategy]  # measured at batch 16 only (wnut); kept at every batch size


def auto_min_steps() -> int:
    return AUTO_MIN_STEPS


def cpu_bf16_needs_amx() -> bool:
    return False  # text encoders: bf16 on AMX or AVX512-BF16 CPUs


def extra_loss_weights(cfg: Config, labels: LabelSpace) -> np.ndarray | None:
    """token_classification.o_tag_weight: the loss weight of the O tag (entity tags weigh 1)."""
    weight = cfg.token_classification.o_tag_weight
    if weight == 1.0:
        return None
    weights = np.ones(len(labels.names), np.float32)
    weights[labels.names.index("O")] = weight
    return weights


# ---------------------------------------------------------------- outputs

def default_metric(labels: LabelSpace) -> str:
    return "f1"


def degenerate_predictions(metrics: dict, labels: LabelSpace) -> str | None:
    """'finds no entity' when not one gold entity of the validation split is found."""
    support = sum(c["support"] for c in metrics.get("per_class", {}).values())
    return "finds no entity (entity F1 0)" if support and metrics["f1"] == 0.0 else None


def _word_log_probs(logits, n_words: int, num_tags: int) -> np.ndarray:
    """(n_words, tags) log-probabilities; words past max_length (no logits) are certain O (tag 0)."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1, num_tags)[:n_words]
    x = x - x.max(axis=1, keepdims=True)
    x = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    if len(x) < n_words:
        pad = np.full((n_words - len(x), num_tags), -1e9, dtype=np.float32)
        pad[:, 0] = 0.0
        x = np.concatenate([x, pad])
    return x


def predict_tags(logits, n_words: list[int], labels: LabelSpace) -> tuple[list[list[str]], list[np.ndarray]]:
    """BIO tags per word (Viterbi under the BIO rules) and the probability of each chosen tag."""
    tags, probs = [], []
    for lg, n in zip(logits, n_words):
        lp = _word_log_probs(lg, n, len(labels.names))
        path = tagging.bio_decode(lp, labels.names)
        tags.append([labels.names[k] for k in path])
        probs.append(np.exp(lp[np.arange(n), path]) if n else np.zeros(0))
    return tags, probs


def compute_metrics(logits, targets, labels: LabelSpace) -> dict:
    """Entity-level precision / recall / F1 (seqeval, strict BIO), per entity type, and token accuracy."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    gold = [[labels.names[k] for k in t] for t in targets]
    pred, _ = predict_tags(logits, [len(g) for g in gold], labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined precision/recall for a type never predicted: reported as 0
        report = classification_report(gold, pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    words = sum(len(g) for g in gold)
    correct = sum(p == g for ps, gs in zip(pred, gold) for p, g in zip(ps, gs))
    out = {"f1": float(micro["f1-score"]), "precision": float(micro["precision"]), "recall": float(micro["recall"]),
           "token_accuracy": correct / max(1, words)}
    out["per_class"] = {t: {"precision": float(report[t]["precision"]), "recall": float(report[t]["recall"]),
                            "f1": float(report[t]["f1-score"]), "support": int(report[t]["support"])}
                        if t in report else {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
                        for t in labels.types}
    return out


def predictions_frame(examples: Examples, logits, labels: LabelSpace) -> pd.DataFrame:
    """One row per sentence: predicted tags per word (in the data's scheme) and the entities.

    Raw-text input gives entities with character offsets into the text; pre-tokenised input
    gives word offsets (start_word, end_word; end exclusive).
    """
    sents = examples.sentences
    tags, probs = predict_tags(logits, [len(w) for w in sents.tokens], labels)
    rows = []
    for i, (words, bio, p) in enumerate(zip(sents.tokens, tags, probs)):
        spans = tagging.to_spans(bio, "BIO")[0]
        entities = []
        for kind, start, end in spans:
            score = round(float(np.mean(p[start:end])), 6)
            if sents.texts is not None:
                a, b = sents.offsets[i][start][0], sents.offsets[i][end - 1][1]
                entities.append({"type": kind, "text": sents.texts[i][a:b], "start": a, "end": b, "score": score})
            else:
                entities.append({"type": kind, "text": " ".join(words[start:end]), "start_word": start,
                                 "end_word": end, "score": score})
        row = {"tokens": words, "predicted_tags": tagging.from_spans(spans, len(words), labels.scheme),
               "entities": entities}
        if sents.tags is not None:
            row["tags"] = sents.tags[i]
        rows.append(row)
    frame = pd.DataFrame(rows)
    if sents.frame is not None:  # keep the input's columns first (its text, ids...)
        extra = sents.frame.drop(columns=[c for c in frame.columns if c in sents.frame.columns])
        frame = pd.concat([extra.reset_index(drop=True), frame], axis=1)
    return frame
