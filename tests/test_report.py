"""The report end to end: written at the end of train, cv and search (every registered task, through the
tiny cases of test_tasks), drawn in real headless Chromium (not blank, plots visible), several runs side by
side, a task the report does not know, bad input, and a report that fails is only a warning."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import sentiment_rows, tiny_config
from PIL import Image
from test_tasks import CASES

import tunesmith
from tunesmith.cli import main
from tunesmith.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """A finished run of every registered task, a 2-fold cv and a 2-trial search, each with the report
    that finishing wrote (report: true is the default; conftest's tiny_config turns it off)."""
    root = tmp_path_factory.mktemp("report")
    out: dict[str, Path] = {}
    for name, make in CASES.items():
        (root / name).mkdir()
        case = make(root / name)
        cfg = {**case["config"], "data": {"train": str(case["train"]), "test": str(case["test"]),
                                          "validation_fraction": 0.2},
               "output": {"dir": str(root / "runs"), "name": name}}
        cfg["train"] = {**cfg["train"], "epochs": 1, "eval_every_steps": 4}
        out[name] = tunesmith.train(cfg).run_dir
    pd.DataFrame(sentiment_rows(96, seed=7)).to_csv(root / "train.csv", index=False)
    cfg = tiny_config(tiny_model_dir, root / "train.csv", None, root / "runs", epochs=1, eval_every_steps=2)
    del cfg["report"]
    out["cv"] = tunesmith.cv({**cfg, "output": {**cfg["output"], "name": "cv"}, "tracking": ["tensorboard"]},
                             folds=2).cv_dir
    cfg["search"] = {"trials": 2, "startup_trials": 1, "pruning": False,
                     "space": {"train.lr": {"low": 1e-4, "high": 5e-3, "log": True}}}
    out["search"] = tunesmith.search({**cfg, "output": {**cfg["output"], "name": "search"}}).search_dir
    return out


def _parts(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_finishing_writes_a_report_for_every_task_cv_and_search(runs):
    pages = {name: (folder / "report.html").read_text() for name, folder in runs.items()}
    for name, page in pages.items():
        assert "could not draw" not in page, name
        assert "configuration" in " ".join(_parts(page)).lower(), name
        assert "http" not in re.sub(r"<pre>.*?</pre>", "", page, flags=re.DOTALL).replace("http-equiv", ""), \
            f"{name}: the page must not load anything"
    for name in CASES:
        assert {"Metrics", "Training", "Run facts"} <= set(_parts(pages[name])), name
    text = _parts(pages["text_classification"])
    for part in ("Learning rate", "Confusion matrix (test)", "Per class (test)", "Calibration (test)"):
        assert part in text
    assert any(p.startswith("Precision-recall and ROC") for p in text)
    ner = pages["token_classification"]
    assert "Per class (test)" in _parts(ner) and "<td>LOC</td>" in ner and "<td>PER</td>" in ner
    assert "Confusion matrix (test)" not in _parts(ner)  # entity F1 has no matrix
    assert {"Folds (mean and sample standard deviation)", "Folds overlaid",
            "Confusion matrix (out-of-fold)"} <= set(_parts(pages["cv"]))
    assert {"Trial values", "Parameter importance", "Trials", "Trials overlaid"} <= set(_parts(pages["search"]))
    trials = json.loads((runs["search"] / "search.json").read_text())["trials"]
    assert all(t["started"] for t in trials) and "<th>started</th>" in pages["search"]  # values over time
    assert pages["text_classification"].count("data:image/png;base64,") >= 6
    image_preds = pd.read_csv(runs["image_classification"] / "test_predictions.csv")
    if (image_preds["predicted_label"] != image_preds["label"]).any():  # one epoch: usually some
        grid = pages["image_classification"].split("<h2>Misclassified images (test)</h2>")[1]
        assert grid.startswith("<div class=grid><figure><img alt='' src='data:image/png;base64,")


def test_a_cv_folder_is_tracked_as_one_run(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["cv"].parent / "tensorboard" / "cv"))
    events.Reload()
    info = json.loads((runs["cv"] / "cv.json").read_text())
    assert [(e.step, e.value) for e in events.Scalars("fold/macro_f1")] == \
        [(i, pytest.approx(f["macro_f1"])) for i, f in enumerate(info["per_fold"], start=1)]
    assert events.Scalars("cv_mean/accuracy")[0].value == pytest.approx(info["mean"]["accuracy"])
    assert (runs["cv"].parent / "tensorboard" / "cv" / "report.html").is_file()


def _screenshot(page: Path, png: Path, profile: Path) -> subprocess.Popen:
    return subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             f"--user-data-dir={profile}", "--window-size=1000,1600", f"--screenshot={png}",
                             page.resolve().as_uri()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _drawn(png: Path) -> tuple[float, float]:
    """(share of non-white pixels, share of coloured pixels): text is grey, plots and heatmaps are coloured."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return float((rgb.min(axis=2) < 200).mean()), float((rgb.max(axis=2) - rgb.min(axis=2) > 60).mean())


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_reports_render_in_headless_chromium(runs, tmp_path):
    (tmp_path / "text_only.html").write_text("<html><body><h1>tunesmith report</h1><p>no plots</p></body></html>")
    pages = {name: runs[name] / "report.html" for name in ("text_classification", "token_classification", "cv",
                                                             "search")}
    pages["text_only"] = tmp_path / "text_only.html"  # the control: the check must tell it apart
    procs = {name: _screenshot(page, tmp_path / f"{name}.png", tmp_path / f"profile-{name}")
             for name, page in pages.items()}  # one browser each, all at once
    for name, proc in procs.items():
        assert proc.wait(timeout=90) == 0, name
    drawn = {name: _drawn(tmp_path / f"{name}.png") for name in pages}
    for name in ("text_classification", "token_classification", "cv", "search"):
        ink, colour = drawn[name]
        assert ink > 0.03 and colour > 0.005, (name, drawn[name])
    ink, colour = drawn["text_only"]
    assert colour < 0.001, drawn["text_only"]


def test_cli_report_side_by_side_and_bad_input(runs, tmp_path, capsys):
    out = tmp_path / "both.html"
    assert main(["report", str(runs["token_classification"]), str(runs["search"]), "--output", str(out)]) == 0
    page = out.read_text()
    assert _parts(page)[0] == "Side by side" and page.count("<details>") == 2
    table = page.split("<h2>Side by side</h2>")[1].split("</table>")[0]
    assert "token_classification" in table and ">search<" in table and "best macro_f1" in table
    assert capsys.readouterr().err.strip() == f"tunesmith: report in {out}"

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: not found (give a run, cv or search folder)"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a finished tunesmith run, cv or search folder" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["report", str(runs["cv"]), "--output", str(tmp_path / "file" / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the report" in err[0]


def test_a_task_the_report_does_not_know_gets_curves_metrics_and_config(runs, tmp_path):
    folder = tmp_path / "lm-run"
    shutil.copytree(runs["text_classification"], folder, ignore=shutil.ignore_patterns("model", "report.html"))
    config = (folder / "config.yaml").read_text().replace("task: text_classification", "task: causal_lm")
    (folder / "config.yaml").write_text(config)
    summary = json.loads((folder / "metrics.json").read_text())
    summary["test"] = {"perplexity": 12.5, "loss": 2.53}
    summary.pop("validation")
    (folder / "metrics.json").write_text(json.dumps(summary))
    pd.DataFrame({"prompt": ["hi"], "generation": ["hello there"]}).to_csv(folder / "test_predictions.csv", index=False)
    page = write_report([folder]).read_text()
    assert _parts(page)[:3] == ["Metrics", "Training", "Learning rate"] and "Configuration" in _parts(page)
    assert "perplexity" in page and "causal_lm" in page and "could not draw" not in page
    assert not any(p.startswith(("Confusion", "Calibration", "Per class")) for p in _parts(page))


def test_a_failing_report_is_a_warning_and_report_false_skips_it(tiny_model_dir, sentiment_csv, tmp_path,
                                                                   monkeypatch, capsys):
    import tunesmith.report

    def broken(runs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tunesmith.report, "render", broken)
    cfg = tiny_config(tiny_model_dir, *sentiment_csv, tmp_path / "runs", epochs=1)
    result = tunesmith.train({**cfg, "report": True})
    assert (result.run_dir / "metrics.json").is_file() and not (result.run_dir / "report.html").exists()
    assert f"warning: could not write the report (RuntimeError: disk on fire); try: tunesmith report {result.run_dir}" \
        in capsys.readouterr().err
    monkeypatch.undo()
    result = tunesmith.train({**cfg, "report": False})
    assert not (result.run_dir / "report.html").exists() and "report in" not in capsys.readouterr().err


def test_data_in_the_page_is_escaped():
    from tunesmith import report_data as rd
    from tunesmith.report import render

    frame = pd.DataFrame({"text": ["<script>alert(1)</script>", "fine"], "label": ["neg", "pos"],
                          "predicted_label": ["pos", "pos"], "prob_neg": [0.1, 0.2], "prob_pos": [0.9, 0.8]})
    run = rd.RunData(Path("<b>run</b>"), "run", {"data": {"label_column": "label"}, "note": "</pre><i>x</i>"},
                     {"test": {"accuracy": 0.5}}, predictions=frame)
    page = render([run])
    assert "Most confident mistakes (test)" in _parts(page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>run</b>" not in page and "<i>x</i>" not in page


def test_the_learning_rate_part_marks_unfreeze_events():
    from tunesmith import report_data as rd
    from tunesmith.report import render

    records = [{"type": "train", "step": s, "loss": 1.0 / s, "lr": 1e-3 * (1 - s / 10)} for s in range(1, 10)]
    records += [{"type": "unfreeze", "step": 3, "layer": "layer.1"}, {"type": "unfreeze", "step": 6, "layer": "layer.0"}]
    page = render([rd.RunData(Path("gradual"), "run", {}, {}, records=records)])
    assert _parts(page) == ["Training", "Learning rate"]
    assert "unfrozen: layer.1 at step 3, layer.0 at step 6" in page


def test_many_classes_give_tables_instead_of_unreadable_plots():
    from tunesmith import report_data as rd
    from tunesmith.report import MAX_CLASSES_DRAWN, render

    n = MAX_CLASSES_DRAWN + 1
    matrix = np.eye(n, dtype=int) * 3
    matrix[0, 1] = 2
    names = [f"c{i}" for i in range(n)]
    metrics = {"accuracy": 0.9, "confusion_matrix": matrix.tolist(),
               "per_class": {c: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3} for c in names}}
    page = render([rd.RunData(Path("many"), "run", {}, {"test": metrics})])
    confusion = page.split("<h2>Confusion matrix (test)</h2>")[1].split("<h2>")[0]
    assert f"{n} classes: the most frequent confusions" in confusion and "<img" not in confusion
    assert "<td>c0</td>" in confusion and "<td>c1</td>" in confusion and "<td>2</td>" in confusion
    assert "<img" not in page.split("<h2>Per class (test)</h2>")[1]
