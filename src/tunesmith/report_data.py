"""The data behind every part of the report, read from run, cv and search folders.

No plotting here (report.py draws): each function turns what a folder holds into plain arrays and
rows, so the numbers behind each plot are unit-tested. Nothing here names a task: a part appears when
the folder has what it needs (probability columns, a confusion matrix, entity rows, image paths), so
a task the report does not know still gets its curves, metrics and config.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .errors import TunesmithError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SUMMARY_FILES = {"metrics.json": "run", "cv.json": "cv", "search.json": "search"}


@dataclass
class RunData:
    """One folder as the report sees it."""
    folder: Path
    kind: str                         # run | cv | search
    config: dict
    summary: dict                     # metrics.json, cv.json or search.json
    records: list[dict] = field(default_factory=list)    # metrics.jsonl (a run)
    predictions: pd.DataFrame | None = None              # test (run) or out-of-fold (cv) predictions
    children: list[RunData] = field(default_factory=list)  # the folds of a cv, the trials of a search

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def metrics(self) -> dict:
        """The metrics the report shows first: test, else validation (a run); pooled out-of-fold (cv)."""
        if self.kind == "cv":
            return self.summary.get("pooled_out_of_fold") or {}
        return self.summary.get("test") or self.summary.get("validation") or {}


# ---------------------------------------------------------------- reading folders

def load_folder(folder: str | Path, children: bool = True) -> RunData:
    """A finished run, cv or search folder (its summary file says which); one-line errors otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TunesmithError(f"{folder}: not found (give a run, cv or search folder)")
    found = [(name, kind) for name, kind in SUMMARY_FILES.items() if (folder / name).is_file()]
    if not found:
        raise TunesmithError(f"{folder}: not a finished tunesmith run, cv or search folder "
                             f"(none of {', '.join(SUMMARY_FILES)})")
    name, kind = found[0]
    data = RunData(folder, kind, _read_yaml(folder / "config.yaml"), _read_json(folder / name))
    if kind == "run":
        data.records = read_records(folder / "metrics.jsonl")
        data.predictions = read_predictions(folder / "test_predictions.csv")
    elif kind == "cv":
        data.predictions = read_predictions(folder / data.summary.get("predictions", "oof_predictions.csv"))
    if children and kind in ("cv", "search"):
        pattern = "fold-*" if kind == "cv" else "trial-*"
        data.children = [load_folder(f, children=False) for f in sorted(folder.glob(pattern))
                         if (f / "metrics.json").is_file() or (f / "cv.json").is_file()]
    if not data.config and data.children:  # a cv run by a search trial keeps its config in the folds
        data.config = data.children[0].config
    return data


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"{path}: cannot read ({exc})") from None
    if not isinstance(value, dict):
        raise TunesmithError(f"{path}: expected a JSON object")
    return value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TunesmithError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    return value if isinstance(value, dict) else {}


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl; a line cut short (a kill) is skipped, as --resume would."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_predictions(path: Path) -> pd.DataFrame | None:
    """A predictions file; list and dict cells written into a CSV (tags, entities) are read back as
    Python values (ast.literal_eval: literals only, never code)."""
    if path.suffix == ".csv" and not path.is_file():
        path = path.with_suffix(".jsonl")
    if not path.is_file():
        return None
    frame = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path)
    for column in frame.columns:
        first = frame[column].dropna().head(1).tolist()
        if first and isinstance(first[0], str) and first[0][:1] in "[{":
            try:
                frame[column] = [ast.literal_eval(v) if isinstance(v, str) else v for v in frame[column]]
            except (ValueError, SyntaxError, RecursionError):  # text that only looks like a list
                pass
    return frame


# ---------------------------------------------------------------- curves

def curves(records: list[dict]) -> dict:
    """Training loss and learning rate against the optimizer step (the "train" lines; older runs: the
    evaluation lines), every validation metric against the step, and the unfreeze events."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    source = train if train else [dict(r, loss=r.get("train_loss")) for r in evals]
    loss = [(r["step"], r["loss"]) for r in source if r.get("loss") is not None]
    lr = [(r["step"], r["lr"]) for r in source if r.get("lr") is not None]
    validation: dict[str, list[tuple[int, float]]] = {}
    for r in evals:
        for metric, value in (r.get("validation") or {}).items():
            if isinstance(value, (int, float)):
                validation.setdefault(metric, []).append((r["step"], float(value)))
    unfreeze = [(r["step"], r.get("layer", "")) for r in records if r.get("type") == "unfreeze"]
    return {"loss": loss, "lr": lr, "validation": validation, "unfreeze": unfreeze}


# ---------------------------------------------------------------- classification

@dataclass
class Scored:
    """Single-label predictions with their probabilities: what the confusion-free plots need."""
    names: list[str]
    y_true: np.ndarray      # class index per row
    probs: np.ndarray       # (rows, classes)
    frame: pd.DataFrame     # the rows with a known label, as in the predictions file

    @property
    def y_pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def scored(frame: pd.DataFrame | None, label_column: str) -> Scored | None:
    """Rows with a true label, a predicted label and one prob_<class> column per class; None otherwise."""
    if frame is None or "predicted_label" not in frame or label_column not in frame:
        return None
    names = [c[len("prob_"):] for c in frame.columns if c.startswith("prob_")]
    if len(names) < 2:
        return None
    index = {n: i for i, n in enumerate(names)}
    labels = frame[label_column].astype(str)
    known = labels.isin(index).to_numpy()
    if not known.any():
        return None
    kept = frame[known].reset_index(drop=True)
    probs = kept[[f"prob_{n}" for n in names]].to_numpy(dtype=float)
    return Scored(names, labels[known].map(index).to_numpy(), probs, kept)


def confusion(metrics: dict) -> tuple[np.ndarray, list[str]] | None:
    """(matrix: rows true class, columns predicted; class names) from saved metrics."""
    matrix, per_class = metrics.get("confusion_matrix"), metrics.get("per_class")
    if not matrix or not per_class or len(per_class) != len(matrix):
        return None
    return np.asarray(matrix), list(per_class)


def top_confusions(matrix: np.ndarray, names: list[str], k: int = 20) -> pd.DataFrame:
    """The k largest off-diagonal cells (true class, predicted class, count): the readable part of a
    confusion matrix with too many classes to draw."""
    off = matrix.astype(float).copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    rows = [(names[i], names[j], int(matrix[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape)) if off[i, j] > 0]
    return pd.DataFrame(rows, columns=["true", "predicted", "count"])


def per_class(metrics: dict) -> list[dict]:
    """One row per class (or entity type): precision, recall, F1, support, as saved."""
    return [{"name": name, **row} for name, row in (metrics.get("per_class") or {}).items() if isinstance(row, dict)]


def binary_curves(y_true: np.ndarray, p_positive: np.ndarray) -> dict | None:
    """Precision-recall and ROC curves of a two-class task (class 1 positive); None without both classes."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    if len(np.unique(y_true)) < 2:
        return None
    precision, recall, _ = precision_recall_curve(y_true, p_positive)
    fpr, tpr, _ = roc_curve(y_true, p_positive)
    return {"precision": precision, "recall": recall, "average_precision": float(average_precision_score(y_true, p_positive)),
            "fpr": fpr, "tpr": tpr, "auc": float(auc(fpr, tpr))}


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """Reliability of the top-class probability: per equal-width confidence bin, the mean confidence,
    the accuracy and the count; ECE = sum over bins of count/n x |accuracy - confidence|."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append({"low": edges[b], "high": edges[b + 1], "confidence": float(confidence[inside].mean()),
                         "accuracy": float(correct[inside].mean()), "count": int(inside.sum())})
    ece = sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / max(1, len(y_true))
    return {"bins": rows, "ece": float(ece)}


def worst_errors(s: Scored, k: int = 10) -> pd.DataFrame:
    """The k mistakes made with the highest confidence: the input columns, true and predicted class,
    and the probability given to the wrong answer."""
    wrong = np.flatnonzero(s.y_pred != s.y_true)
    confidence = s.probs.max(axis=1)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:k]
    inputs = [c for c in s.frame.columns if not c.startswith("prob_") and c not in ("predicted_label", "top3", "top5")]
    out = s.frame.iloc[order][inputs].copy()
    out["true"] = [s.names[i] for i in s.y_true[order]]
    out["predicted"] = [s.names[i] for i in s.y_pred[order]]
    out["confidence"] = np.round(confidence[order], 4)
    return out.reset_index(drop=True)


# ---------------------------------------------------------------- entities (word-level tags)

def tag_errors(frame: pd.DataFrame | None, k: int = 10) -> pd.DataFrame | None:
    """Sentences whose predicted tags differ from the gold tags, the most confident first (confidence:
    the highest score among its predicted entities; misses alone score 0), with the words that differ
    as word (gold -> predicted). None when the rows have no word-level tags."""
    needed = ("tokens", "tags", "predicted_tags")
    if frame is None or any(c not in frame for c in needed):
        return None
    rows = []
    for i, r in frame.iterrows():
        words, gold, pred = r["tokens"], r["tags"], r["predicted_tags"]
        if not isinstance(words, list) or gold == pred:
            continue
        diffs = [f"{w} ({g} -> {p})" for w, g, p in zip(words, gold, pred) if g != p]
        scores = [e.get("score", 0.0) for e in (r.get("entities") or []) if isinstance(e, dict)]
        rows.append({"row": i + 1, "text": " ".join(map(str, words)), "differences": "; ".join(diffs),
                     "confidence": round(float(max(scores, default=0.0)), 4)})
    out = pd.DataFrame(rows, columns=["row", "text", "differences", "confidence"])
    return out.sort_values("confidence", ascending=False, kind="stable").head(k).reset_index(drop=True)


# ---------------------------------------------------------------- images

def image_column(frame: pd.DataFrame) -> str | None:
    """The column of image paths, if the rows have one (values ending in an image suffix)."""
    for column in frame.columns:
        values = frame[column].dropna().head(5).tolist()
        if values and all(isinstance(v, str) and v.lower().endswith(IMAGE_SUFFIXES) for v in values):
            return column
    return None


def misclassified_images(s: Scored, base: Path | None, k: int = 16) -> list[dict]:
    """The k most confident mistakes whose image file can be found (absolute, or relative to `base`,
    the test table's folder): path, true and predicted class, confidence."""
    column = image_column(s.frame)
    if column is None:
        return []
    out = []
    for _, row in worst_errors(s, k=len(s.frame)).iterrows():
        path = Path(row[column])
        if not path.is_absolute() and base is not None:
            path = base / path
        if path.is_file():
            out.append({"path": path, "true": row["true"], "predicted": row["predicted"],
                        "confidence": row["confidence"]})
        if len(out) == k:
            break
    return out


# ---------------------------------------------------------------- the run's facts

def facts(run: RunData) -> list[tuple[str, str]]:
    """Data sizes, class counts, steps, speed and hardware, as (what, value) rows."""
    s, out = run.summary, []
    data, train = s.get("data") or {}, s.get("train") or {}
    if data:
        out.append(("examples", ", ".join(f"{k} {data[k]:,}" for k in ("train", "validation", "test") if k in data)))
    for split, counts in ((s.get("imbalance") or {}).get("distribution") or {}).items():
        if counts:
            out.append((f"classes ({split})", ", ".join(f"{k} {v:,}" for k, v in counts.items())))
    if train:
        out.append(("training", (f"{train.get('steps')} steps in {train.get('seconds')} s, "
                                f"{train.get('samples_per_second')} samples/s, precision {train.get('precision')}")))
        if train.get("trainable_parameters"):
            out.append(("parameters", f"{train['trainable_parameters']:,} trainable of {train['total_parameters']:,}"))
    if "test_samples_per_second" in s:
        out.append(("evaluation speed", f"{s['test_samples_per_second']} samples/s (test split)"))
    if s.get("best_step") is not None:
        out.append(("best checkpoint", f"step {s['best_step']} ({_shown(s.get('best_validation'))})"))
    if (s.get("refit") or {}).get("status") == "done":  # the curves are the first run's; the model and test are the refit's
        out.append(("refit", (f"trained again on {s['refit'].get('rows')} rows (train + validation) for "
                             f"{s['refit'].get('steps')} steps in {s['refit'].get('seconds')} s; the test metrics are its")))
    if (s.get("plan") or {}).get("stopped"):
        out.append(("stopped by", s["plan"]["stopped"]))
    hw = s.get("hardware") or {}
    if hw:
        out.append(("hardware", (f"{hw.get('device')}; {hw.get('gpu') or hw.get('cpu')}; {hw.get('cpu_cores')} cores, "
                                f"{hw.get('torch_threads')} torch threads; torch {hw.get('torch')}")))
    return out


def _shown(values: Any) -> str:
    if isinstance(values, dict):
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
    return str(values)


def scalars(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4} (lists kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def comparison(runs: list[RunData]) -> pd.DataFrame:
    """One row per run: the config keys that differ between the runs, then the metrics and the speed."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})
    differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1
                 and not k.startswith(("output.", "data.")) or k == "task"]
    rows = []
    for run, f in zip(runs, flat):
        row: dict[str, Any] = {"run": run.name, "kind": run.kind}
        row.update({k: f.get(k) for k in differing})
        if run.kind == "cv":
            row.update({f"{m} (mean)": v for m, v in scalars(run.summary.get("mean") or {}).items()})
        elif run.kind == "search":
            best = run.summary.get("best") or {}
            row[f"best {run.summary.get('metric')}"] = best.get("value")
        else:
            row.update(scalars(run.metrics))
            row["train s"] = (run.summary.get("train") or {}).get("seconds")
            row["samples/s"] = (run.summary.get("train") or {}).get("samples_per_second")
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- cv and search

def fold_table(cv: RunData) -> pd.DataFrame:
    """Per-fold metrics, then the mean and the sample standard deviation."""
    folds = cv.summary.get("per_fold") or []
    frame = pd.DataFrame(folds, index=[f"fold {i}" for i in range(1, len(folds) + 1)])
    for name, key in (("mean", "mean"), ("std", "std_dev")):
        values = cv.summary.get(key) or {}
        if values:
            frame.loc[name] = pd.Series(values)
    return frame


def trial_values(search: RunData) -> dict:
    """Trial number, value and state of every trial, the best value so far (by the study's direction), and
    when each trial started (minutes after the first; None for searches that did not record it)."""
    trials = sorted(search.summary.get("trials") or [], key=lambda t: t["number"])
    maximize = search.summary.get("direction", "maximize") == "maximize"
    numbers, values, states, best_so_far, best = [], [], [], [], None
    for t in trials:
        value = t.get("value")
        numbers.append(t["number"])
        values.append(np.nan if value is None else float(value))
        states.append(t.get("state", ""))
        if value is not None and t.get("state") == "complete":
            best = value if best is None else max(best, value) if maximize else min(best, value)
        best_so_far.append(np.nan if best is None else float(best))
    starts = [t.get("started") for t in trials]
    minutes = None
    if trials and all(starts):  # searches written before trials recorded their start: by number only
        first = min(pd.Timestamp(x) for x in starts)
        minutes = [round((pd.Timestamp(x) - first).total_seconds() / 60, 3) for x in starts]
    return {"number": numbers, "value": values, "state": states, "best_so_far": best_so_far, "minutes": minutes}


def importance(search: RunData) -> dict[str, float]:
    """Optuna's parameter importance, as search saved it (empty when it could not be estimated)."""
    return dict(search.summary.get("importance") or {})
