"""End to end on a tiny random BERT: train -> evaluate -> predict, from Python and from the CLI."""

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import tunesmith
from conftest import TUNESMITH, tiny_config


def test_python_api_trains_and_learns(tiny_model_dir, sentiment_csv, tmp_path):
    train, test = sentiment_csv
    result = tunesmith.train(tiny_config(tiny_model_dir, train, test, tmp_path / "runs"))
    assert result.metrics["accuracy"] > 0.9, result.metrics  # majority class is 0.5
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "test_predictions.csv", "model/model.safetensors"):
        assert (run / name).exists(), name
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1.0, 2.0, 3.0]
    assert all("macro_f1" in r["validation"] and "train_loss" in r for r in evals)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["test"]["accuracy"] == result.metrics["accuracy"]
    assert summary["test"]["confusion_matrix"] and set(summary["test"]["per_class"]) == {"neg", "pos"}
    preds = pd.read_csv(run / "test_predictions.csv")
    assert {"predicted_label", "prob_neg", "prob_pos"} <= set(preds.columns)
    assert np.allclose(preds[["prob_neg", "prob_pos"]].sum(axis=1), 1.0, atol=1e-4)


def test_plain_transformers_loads_model_with_same_predictions(tiny_model_dir, sentiment_csv, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, test = sentiment_csv
    result = tunesmith.train(tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs=2))
    model = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(result.run_dir / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"}
    texts = pd.read_csv(test)["text"].tolist()
    with torch.no_grad():
        probs = model(**tokenizer(texts, padding=True, truncation=True, max_length=32,
                                  return_tensors="pt")).logits.softmax(-1).numpy()
    ours = tunesmith.predict(result.run_dir, test, precision="fp32")
    assert [model.config.id2label[i] for i in probs.argmax(1)] == ours["predicted_label"].tolist()
    assert np.allclose(probs, ours[["prob_neg", "prob_pos"]].to_numpy(), atol=1e-5)


def test_cli_train_evaluate_predict(tiny_model_dir, sentiment_csv, tmp_path, cli_env):
    train, test = sentiment_csv
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, train, test, tmp_path / "runs")))
    proc = subprocess.run(TUNESMITH + ["train", str(cfg_path), "--train.epochs", "4", "--output.name=cli"],
                          capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "cli"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 4
    assert "test: accuracy" in proc.stderr

    proc = subprocess.run(TUNESMITH + ["evaluate", str(run), "--data", str(test), "--output", "m.json"],
                          capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "macro_f1" in proc.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["accuracy"] > 0.8

    new = tmp_path / "new.csv"
    pd.DataFrame({"text": ["a really great and wonderful film", "boring and awful acting"]}).to_csv(new, index=False)
    proc = subprocess.run(TUNESMITH + ["predict", str(run), "--input", str(new), "--output", "preds.csv"],
                          capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert preds["predicted_label"].tolist() == ["pos", "neg"]


@pytest.mark.parametrize("problem_type", ["multi_label", "regression"])
def test_multi_label_and_regression(tiny_model_dir, tmp_path, problem_type):
    from conftest import sentiment_rows

    rows = sentiment_rows(300, seed=3)
    for r in rows:
        long = len(r["text"].split()) > 8
        if problem_type == "multi_label":
            r["label"] = "|".join([r["label"]] + (["long"] if long else []))
        else:
            r["label"] = 1.0 if r["label"] == "pos" else -1.0
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "d.csv", tmp_path / "d.csv", tmp_path / "runs", epochs=10)
    cfg["data"]["problem_type"] = problem_type
    result = tunesmith.train(cfg)
    if problem_type == "multi_label":
        assert {"micro_f1", "macro_f1", "subset_accuracy"} <= set(result.metrics)
        assert result.metrics["micro_f1"] > 0.7
        preds = pd.read_csv(result.run_dir / "test_predictions.csv")
        assert {"predicted_labels", "prob_long", "prob_neg", "prob_pos"} <= set(preds.columns)
    else:
        assert {"mse", "mae", "r2", "spearman"} <= set(result.metrics)
        assert result.metrics["r2"] > 0.5


def test_text_pairs_and_early_stopping(tiny_model_dir, tmp_path):
    from conftest import sentiment_rows

    rows = sentiment_rows(200, seed=4)
    for r in rows:
        r["second"] = "the story"
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "p.csv", None, tmp_path / "runs", epochs=20, lr=1e-6,
                      early_stopping_patience=2, eval_every_steps=2, metric="accuracy")
    cfg["text_classification"] = {"text_pair_column": "second"}
    result = tunesmith.train(cfg)
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = 10  # 160 training rows / batch 16
    assert log[-1]["step"] < 20 * steps_per_epoch, "early stopping should end the run long before 20 epochs"


def test_a_one_row_validation_file_is_enough(tiny_model_dir, sentiment_csv, tmp_path):
    validation = tmp_path / "one.csv"
    pd.DataFrame([{"text": "a good film", "label": "pos"}]).to_csv(validation, index=False)
    cfg = tiny_config(tiny_model_dir, sentiment_csv[0], None, tmp_path / "runs", epochs=1)
    cfg["data"]["validation"] = str(validation)
    result = tunesmith.train(cfg)
    assert set(result.validation_metrics) >= {"accuracy", "macro_f1"}


def test_validation_off_skips_a_catalog_datasets_validation_split(tiny_model_dir, tmp_path, monkeypatch):
    """`data.validation: off` with a catalog dataset that has its own validation split: no validation rows at all
    (none read, none carved out of train), the run trains on every training row and keeps its last model."""
    from conftest import sentiment_rows
    from tunesmith import catalog

    def build(wheels, target):
        for split, n, seed in (("train", 60, 1), ("validation", 20, 2)):
            pd.DataFrame(sentiment_rows(n, seed=seed)).to_csv(target / f"{split}.csv", index=False)

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(catalog.DATASETS, "tiny_reviews", catalog.Entry(
        (), build, "tiny reviews", data_defaults={"train": "train.csv", "validation": "validation.csv"}))
    cfg = tiny_config(tiny_model_dir, tmp_path / "unused.csv", None, tmp_path / "runs", epochs=1)
    cfg["data"] = {"dataset": "tiny_reviews", "validation": False}
    result = tunesmith.train(cfg)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["data"]["train"] == 60 and summary["data"]["validation"] == 0, summary["data"]
    assert not result.validation_metrics
    assert (result.run_dir / "model").is_dir()


def test_test_off_skips_a_catalog_datasets_test_split(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`data.test: off` with a catalog dataset: no test split is read, scored or written, the run's saved config
    keeps it off, and export (which would check on the test split) asks for --data instead."""
    from conftest import sentiment_rows
    from tunesmith import catalog
    from tunesmith.cli import main
    from tunesmith.config import load_config
    from tunesmith.errors import TunesmithError
    from tunesmith.export import export
    from tunesmith.tasks.base import resolve_data_config

    def build(wheels, target):  # a stand-in catalog dataset with its own test split, built without a download
        pd.DataFrame(sentiment_rows(60, seed=1)).to_csv(target / "train.csv", index=False)
        pd.DataFrame(sentiment_rows(20, seed=2)).to_csv(target / "test.csv", index=False)

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(catalog.DATASETS, "tiny_reviews", catalog.Entry(
        (), build, "tiny reviews", data_defaults={"train": "train.csv", "test": "test.csv"}))
    cfg = tiny_config(tiny_model_dir, tmp_path / "unused.csv", None, tmp_path / "runs", epochs=1)
    cfg["data"] = {"dataset": "tiny_reviews", "validation_fraction": 0.2}
    assert resolve_data_config(load_config(cfg).data).test.endswith("test.csv")  # absent: the catalog's own split
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg).replace("  dataset: tiny_reviews\n", "  dataset: tiny_reviews\n  test: off\n"))
    assert "test: off" in path.read_text()

    assert main(["train", str(path), "--output.name", "r", "--train.max_steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "tunesmith: test:" not in err, err
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "metrics.json").read_text())
    assert "test" not in summary and summary["data"]["test"] == 0
    assert not (run / "test_predictions.csv").exists()
    assert all(json.loads(line)["type"] != "test" for line in (run / "metrics.jsonl").read_text().splitlines())
    assert load_config(run / "config.yaml", saved=True).data.test is False
    with pytest.raises(TunesmithError, match="the run has no test split"):
        export(run)
