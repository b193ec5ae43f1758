"""`tunesmith report RUN [RUN ...]`: one self-contained HTML file (plots inlined as base64 PNG, no
script, no network) for a run, a cv or a search folder, or several of them side by side.

The numbers come from report_data.py; this module only draws them (matplotlib, Agg) and lays them
out. Each part is drawn on its own: a part whose data is missing is left out, and a part that fails
is replaced by a one-line note, so a task the report does not know still gets a useful page.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import report_data as rd
from .atomic import write_failed, write_text_atomic
from .errors import TunesmithError
from .runlog import log, warn

REPORT_NAME = "report.html"
MAX_CLASSES_DRAWN = 40      # a confusion matrix or bar chart with more classes is unreadable: tables instead
MAX_OVERLAID = 12           # curves drawn in one overlay plot (the rest are listed, not drawn)
IMAGE_GRID = 16
MAX_METRICS_DRAWN = 4       # validation metrics in the training plot (all of them are in the tables)
CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%}.note{color:#777;font-size:13px}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;font-size:12px;width:120px}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:400px}
details{margin:12px 0;border:1px solid #ddd;padding:6px 10px}summary{font-weight:600;cursor:pointer}"""


# ---------------------------------------------------------------- entry points

def write_report(folders: list[str | Path], output: str | Path | None = None) -> Path:
    """Read the folders, write one HTML report; returns its path (default: FOLDER/report.html for one
    folder, report.html in the working folder for several)."""
    if not folders:
        raise TunesmithError("report: give at least one run, cv or search folder")
    runs = [rd.load_folder(f) for f in folders]
    if output is None:
        output = runs[0].folder / REPORT_NAME if len(runs) == 1 else Path(REPORT_NAME)
    output = Path(output)
    page = render(runs)
    try:
        write_text_atomic(output, page)
    except OSError as exc:
        raise write_failed(output, exc, "the report") from None
    return output


def report_after(folder: Path) -> Path | None:
    """The report at the end of train, cv or search: a failure is a warning, never a failed run."""
    started = time.perf_counter()
    try:
        path = write_report([folder])
    except Exception as exc:  # noqa: BLE001 — whatever went wrong, the trained model is what matters
        warn(f"could not write the report ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
             f"try: tunesmith report {folder}")
        return None
    log(f"report in {path} ({time.perf_counter() - started:.1f}s)")
    return path


def render(runs: list[rd.RunData]) -> str:
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs compared"
    body = [f"<h1>tunesmith report: {_e(title)}</h1>",
            f"<p class=note>written {time.strftime('%Y-%m-%d %H:%M:%S')} from {', '.join(_e(str(r.folder)) for r in runs)}</p>"]
    if len(runs) > 1:
        body += _part("Side by side", lambda: _comparison(runs))
        for run in runs:
            body.append(f"<details><summary>{_e(run.name)} ({run.kind})</summary>{''.join(_folder(run))}</details>")
    else:
        body += _folder(runs[0])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def _folder(run: rd.RunData) -> list[str]:
    if run.kind == "cv":
        return _cv(run)
    if run.kind == "search":
        return _search(run)
    return _run(run)


# ---------------------------------------------------------------- one run

def _run(run: rd.RunData) -> list[str]:
    out = _part("Metrics", lambda: _metrics_table(run))
    data = rd.curves(run.records)
    out += _part("Training", lambda: _curves_figure(data, run.summary.get("best_step"), _main_metric(run)))
    out += _part("Learning rate", lambda: _lr_figure(data))
    out += _classification_parts(run, "test" if run.summary.get("test") else "validation")
    out += _part("Run facts", lambda: _table(pd.DataFrame(rd.facts(run), columns=["", ""]), header=False))
    out += _part("Configuration", lambda: _config(run.config))
    return out


def _classification_parts(run: rd.RunData, split: str) -> list[str]:
    """Whatever of the class and entity views this folder's metrics and predictions support."""
    metrics, label_column = run.metrics, (run.config.get("data") or {}).get("label_column", "label")
    scored = rd.scored(run.predictions, label_column)
    out = _part(f"Confusion matrix ({split})", lambda: _confusion_figure(metrics))
    out += _part(f"Per class ({split})", lambda: _per_class(metrics))
    if scored is not None and len(scored.names) == 2:
        out += _part(f"Precision-recall and ROC ({split}, positive class '{scored.names[1]}')",
                     lambda: _binary_figure(scored))
    if scored is not None:
        out += _part(f"Calibration ({split})", lambda: _calibration_figure(scored))
        out += _part(f"Most confident mistakes ({split})", lambda: _table(rd.worst_errors(scored)))
        test_file = (run.config.get("data") or {}).get("test")
        base = Path(test_file).parent if test_file else None
        out += _part(f"Misclassified images ({split})", lambda: _image_grid(rd.misclassified_images(scored, base)))
    out += _part(f"Most confident tagging mistakes ({split})", lambda: _table(rd.tag_errors(run.predictions)))
    return out


def _metrics_table(run: rd.RunData) -> str | None:
    rows = {}
    for split in ("validation", "test"):
        values = rd.scalars(run.summary.get(split) or {})
        if values:
            rows[split] = values
    return _table(pd.DataFrame(rows).T.round(4), index=True) if rows else None


def _per_class(metrics: dict) -> str | None:
    rows = rd.per_class(metrics)
    if not rows:
        return None
    frame = pd.DataFrame(rows).round(4)
    if len(rows) > MAX_CLASSES_DRAWN or not {"precision", "recall", "f1"} <= set(frame.columns):
        return _table(frame)
    fig, ax = _plt().subplots(figsize=(max(5, 0.7 * len(rows) + 2), 3.2))
    x, width = np.arange(len(rows)), 0.27
    for j, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (j - 1) * width, frame[key], width, label=key)
    ax.set_xticks(x, frame["name"], rotation=30 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncols=3)
    return _img(fig) + _table(frame)


# ---------------------------------------------------------------- figures

def _curves_figure(data: dict, best_step: int | None, main_metric: str | None) -> str | None:
    if not data["loss"] and not data["validation"]:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    if data["loss"]:
        steps, loss = zip(*data["loss"])
        axes[0].plot(steps, loss, label="training loss")
    if "loss" in data["validation"]:
        steps, loss = zip(*data["validation"]["loss"])
        axes[0].plot(steps, loss, "o-", label="validation loss")
    axes[0].set_xlabel("optimizer step")
    axes[0].set_title("loss", fontsize=10)
    axes[0].legend(fontsize=8)
    # the metric that picks the best checkpoint, then a few others (weighted_* and the like crowd the plot)
    shown = sorted((m for m in data["validation"] if m != "loss"), key=lambda m: (m != main_metric, "_" in m))
    for metric in shown[:MAX_METRICS_DRAWN]:
        steps, values = zip(*data["validation"][metric])
        axes[1].plot(steps, values, "o-", label=metric, markersize=3)
    if best_step is not None:
        axes[1].axvline(best_step, color="grey", linestyle=":", label=f"best step {best_step}")
    axes[1].set_xlabel("optimizer step")
    axes[1].set_title("validation metrics", fontsize=10)
    if axes[1].lines:
        axes[1].legend(fontsize=8)
    return _img(fig)


def _lr_figure(data: dict) -> str | None:
    if not data["lr"]:
        return None
    fig, ax = _plt().subplots(figsize=(10, 2.6))
    steps, lr = zip(*data["lr"])
    ax.plot(steps, lr, label="learning rate (first layer group)")
    for i, (step, layer) in enumerate(data["unfreeze"]):
        ax.axvline(step, color="tab:red", alpha=0.5, linestyle="--", label="unfreeze" if i == 0 else None)
        ax.annotate(str(layer), (step, max(lr)), fontsize=7, rotation=90, va="top")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)
    note = f"<p class=note>unfrozen: {_e(', '.join(f'{layer} at step {s}' for s, layer in data['unfreeze']))}</p>" \
        if data["unfreeze"] else ""
    return _img(fig) + note


def _confusion_figure(metrics: dict) -> str | None:
    found = rd.confusion(metrics)
    if found is None:
        return None
    matrix, names = found
    if len(names) > MAX_CLASSES_DRAWN:
        return f"<p class=note>{len(names)} classes: the most frequent confusions</p>" + \
            (_table(rd.top_confusions(matrix, names)) or "<p>none</p>")
    size = min(10, 2.5 + 0.45 * len(names))
    fig, ax = _plt().subplots(figsize=(size, size * 0.85))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 15:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center", fontsize=8, color="white" if n > threshold else "black")
    return _img(fig)


def _binary_figure(s: rd.Scored) -> str | None:
    found = rd.binary_curves(s.y_true, s.probs[:, 1])
    if found is None:
        return None
    fig, axes = _plt().subplots(1, 2, figsize=(9, 3.6))
    axes[0].plot(found["recall"], found["precision"])
    axes[0].set(xlabel="recall", ylabel="precision", title=f"precision-recall (AP {found['average_precision']:.3f})",
                xlim=(0, 1), ylim=(0, 1.02))
    axes[1].plot(found["fpr"], found["tpr"])
    axes[1].plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes[1].set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC (AUC {found['auc']:.3f})")
    for ax in axes:
        ax.title.set_fontsize(10)
    return _img(fig)


def _calibration_figure(s: rd.Scored) -> str:
    found = rd.calibration(s.y_true, s.probs)
    bins = found["bins"]
    fig, ax = _plt().subplots(figsize=(4.6, 3.8))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", label="this model")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"calibration (ECE {found['ece']:.3f})", fontsize=10)
    ax.legend(fontsize=8)
    counts = ", ".join(f"{b['low']:.1f}-{b['high']:.1f}: {b['count']}" for b in bins)
    return _img(fig) + f"<p class=note>examples per confidence bin: {_e(counts)}</p>"


def _image_grid(items: list[dict]) -> str | None:
    if not items:
        return None
    cells = []
    for item in items[:IMAGE_GRID]:
        cells.append(f"<figure>{_thumbnail(item['path'])}<figcaption>true {_e(item['true'])}, predicted "
                     f"{_e(item['predicted'])} ({item['confidence']:.2f})</figcaption></figure>")
    return f"<div class=grid>{''.join(cells)}</div>"


def _thumbnail(path: Path) -> str:
    """The image shrunk to 112 px and inlined as PNG (a photo of megabytes stays a few kB)."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((112, 112))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


def _overlay(runs: list[rd.RunData], metric: str | None, title: str) -> str | None:
    """Validation `metric` (and training loss) of several runs against the step, one line per run."""
    drawn = [(r, rd.curves(r.records)) for r in runs if r.records][:MAX_OVERLAID]
    if not drawn:
        return None
    fig, axes = _plt().subplots(1, 2, figsize=(10, 3.4))
    for run, data in drawn:
        if data["loss"]:
            axes[0].plot(*zip(*data["loss"]), label=run.name)
        points = data["validation"].get(metric or "")
        if points:
            axes[1].plot(*zip(*points), "o-", markersize=3, label=run.name)
    axes[0].set(xlabel="optimizer step", title="training loss")
    axes[1].set(xlabel="optimizer step", title=f"validation {metric}")
    for ax in axes:
        ax.title.set_fontsize(10)
        if ax.lines:
            ax.legend(fontsize=7)
    left = len([r for r in runs if r.records]) - len(drawn)
    note = f"<p class=note>{left} more not drawn</p>" if left > 0 else ""
    return f"<p class=note>{_e(title)}</p>" + _img(fig) + note


def _comparison(runs: list[rd.RunData]) -> str:
    metric = _main_metric(runs[0])
    plain = [r for r in runs if r.kind == "run"]
    return _table(rd.comparison(runs).round(4)) + (_overlay(plain, metric, "runs overlaid") or "")


# ---------------------------------------------------------------- cv and search

def _cv(cv: rd.RunData) -> list[str]:
    s = cv.summary
    intro = (f"<p>{s.get('folds_run')} of {s.get('folds')} folds of {s.get('examples')} examples; "
             f"{'grouped, ' if s.get('grouped') else ''}{'stratified' if s.get('stratified') else 'not stratified'}; "
             f"best checkpoint by validation {_e(s.get('metric'))} on the {_e(s.get('checkpoint_selection'))}</p>")
    out = [intro] + _part("Folds (mean and sample standard deviation)", lambda: _table(rd.fold_table(cv).round(4), index=True))
    out += _part("Folds overlaid", lambda: _overlay(cv.children, s.get("metric"), "each fold's run"))
    if s.get("test_ensemble"):
        out += _part("Test split, ensemble of the fold models",
                     lambda: _table(pd.DataFrame([rd.scalars(s["test_ensemble"])]).round(4)))
    out += _classification_parts(cv, "out-of-fold")
    out += _part("Configuration", lambda: _config(cv.config))
    return out


def _search(search: rd.RunData) -> list[str]:
    s = search.summary
    best = s.get("best") or {}
    value = best.get("value")
    intro = (f"<p>{len(s.get('trials') or [])} trials; objective {_e(s.get('objective'))} {_e(s.get('metric'))} "
             f"({_e(s.get('direction'))}); best value {'none yet' if value is None else f'{value:.4f}'} with "
             f"{_e(', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in (best.get('params') or {}).items()))}</p>")
    out = [intro] + _part("Trial values", lambda: _trials_figure(search))
    out += _part("Parameter importance", lambda: _importance_figure(search))
    out += _part("Trials", lambda: _table(_trials_frame(search)))
    runs = [c for c in search.children if c.kind == "run"]
    out += _part("Trials overlaid", lambda: _overlay(runs, s.get("metric"), "each trial's run (pruned ones stop early)"))
    out += _part("Base configuration", lambda: _config(search.config))
    return out


def _trials_figure(search: rd.RunData) -> str | None:
    data = rd.trial_values(search)
    if not data["number"]:
        return None
    fig, ax = _plt().subplots(figsize=(8, 3.2))
    x, value = np.asarray(data["minutes"] or data["number"]), np.asarray(data["value"])
    for state, marker in (("complete", "o"), ("pruned", "x")):
        mask = np.asarray([st == state for st in data["state"]])
        ax.scatter(x[mask], value[mask], marker=marker, label=state)
    ax.step(x, data["best_so_far"], where="post", color="tab:green", label="best so far")
    ax.set(xlabel="minutes after the first trial started" if data["minutes"] else "trial (in the order they started)",
           ylabel=search.summary.get("metric"))
    if not data["minutes"]:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return _img(fig)


def _importance_figure(search: rd.RunData) -> str | None:
    values = rd.importance(search)
    if not values:
        note = search.summary.get("importance_note")
        return f"<p class=note>not available: {_e(note)}</p>" if note else None
    fig, ax = _plt().subplots(figsize=(7, 0.4 * len(values) + 1))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names])
    ax.set_xlabel("importance (Optuna fANOVA; rough with few trials)")
    return _img(fig)


def _trials_frame(search: rd.RunData) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in t.items() if k != "params"} | dict(t.get("params") or {})
                         for t in search.summary.get("trials") or []])


def _main_metric(run: rd.RunData) -> str | None:
    best = run.summary.get("best_validation") or {}
    return next(iter(best), None) or run.summary.get("metric")


# ---------------------------------------------------------------- HTML pieces

def _part(title: str, build: Callable[[], str | None]) -> list[str]:
    """A titled part, left out when build() finds nothing to show; a failure becomes a note."""
    try:
        content = build()
    except Exception as exc:  # noqa: BLE001 — one bad part must not cost the whole report
        content = f"<p class=note>could not draw this part: {_e(type(exc).__name__)}: {_e(str(exc)[:200])}</p>"
    return [f"<h2>{_e(title)}</h2>{content}"] if content else []


def _table(frame: pd.DataFrame | None, index: bool = False, header: bool = True) -> str | None:
    if frame is None or frame.empty:
        return None
    return frame.to_html(index=index, header=header, border=0, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}")


def _config(config: dict) -> str | None:
    return f"<pre>{_e(yaml.safe_dump(config, sort_keys=False))}</pre>" if config else None


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    return plt


def _img(fig) -> str:
    plt = _plt()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return f"<img alt='' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"

