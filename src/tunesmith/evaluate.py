"""Metrics (scikit-learn), kept as plain functions of arrays so every task can share them."""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    mean_squared_error,
    precision_recall_fscore_support,
    r2_score,
)

# Metrics where smaller is better; everything else is maximised.
LOWER_IS_BETTER = {"loss", "perplexity", "mse", "mae"}


def single_label_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    ids = list(range(len(names)))
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    out["per_class"] = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                               "support": int(s[i])} for i, name in enumerate(names)}
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=ids).tolist()
    return out


def multi_label_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> dict:
    out = {"subset_accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("micro", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
    f = f1_score(y_true, y_pred, average=None, zero_division=0)
    out["per_class"] = {name: {"f1": float(f[i]), "support": int(y_true[:, i].sum())} for i, name in enumerate(names)}
    return out


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    constant = len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    rho = float("nan") if constant else spearmanr(y_true, y_pred).statistic  # undefined for constant input
    return {"mse": float(mean_squared_error(y_true, y_pred)), "mae": float(mean_absolute_error(y_true, y_pred)),
            "r2": float(r2_score(y_true, y_pred)) if len(y_true) > 1 else float("nan"),
            "spearman": float(rho)}


def is_improvement(metric: str, new: float, best: float | None) -> bool:
    if best is None or np.isnan(best):
        return not np.isnan(new)
    return new < best if metric in LOWER_IS_BETTER else new > best


def scalar_metrics(metrics: dict) -> dict:
    """The numbers only (no per-class tables), for logs and progress lines."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------- generated text against references

def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: overlap of the normalised words (as multisets)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    """Exact match and token F1 (SQuAD normalisation), averaged over examples."""
    n = max(1, len(references))
    return {"exact_match": sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / n,
            "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n}
