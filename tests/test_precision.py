"""Each run gets the precision it asks for, in any order, any number of times in one process
(accelerate keeps one process-wide state whose mixed precision the first Accelerator fixes)."""

import json

import pytest

import tunesmith
from conftest import tiny_config


def _precision_of(run_dir) -> str:
    return json.loads((run_dir / "metrics.json").read_text())["train"]["precision"]


def test_train_fp32_then_bf16_then_fp32_in_one_process(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    train, test = sentiment_csv
    for i, precision in enumerate(["fp32", "bf16", "fp32", "bf16"]):
        cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs=1, precision=precision)
        cfg["output"]["name"] = f"run-{i}"
        result = tunesmith.train(cfg)
        assert _precision_of(result.run_dir) == precision
        assert f"precision {precision};" in capsys.readouterr().err
        assert result.metrics["accuracy"] >= 0.0


@pytest.mark.parametrize("fast_bf16, expected", [("1", "bf16"), ("0", "fp32")])
def test_precision_auto_resolves_both_ways_after_other_runs(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch,
                                                            fast_bf16, expected):
    train, test = sentiment_csv
    other = "fp32" if expected == "bf16" else "bf16"  # a run of the other precision first
    first = tunesmith.train(tiny_config(tiny_model_dir, train, None, tmp_path / "a", epochs=1, precision=other))
    assert _precision_of(first.run_dir) == other
    monkeypatch.setenv("TUNESMITH_CPU_BF16", fast_bf16)
    second = tunesmith.train(tiny_config(tiny_model_dir, train, test, tmp_path / "b", epochs=1, precision="auto"))
    assert _precision_of(second.run_dir) == expected


def test_cv_and_search_after_runs_of_another_precision(tiny_model_dir, sentiment_csv, tmp_path):
    train, _ = sentiment_csv
    tunesmith.train(tiny_config(tiny_model_dir, train, None, tmp_path / "a", epochs=1, precision="fp32"))
    cv = tunesmith.cv(tiny_config(tiny_model_dir, train, None, tmp_path / "cv", epochs=1, precision="bf16"), folds=2)
    assert all(_precision_of(cv.cv_dir / f"fold-{i}") == "bf16" for i in (1, 2))
    cfg = tiny_config(tiny_model_dir, train, None, tmp_path / "s", epochs=1, precision="fp32")
    # both precisions inside one search, one trial each (categorical choices, TPE seed 0)
    cfg["search"] = {"trials": 4, "startup_trials": 4, "pruning": False,
                     "space": {"train.precision": {"choices": ["fp32", "bf16"]}}}
    result = tunesmith.search(cfg)
    assert [t["state"] for t in result.trials] == ["complete"] * 4
    used = {t["params"]["train.precision"] for t in result.trials}
    assert used == {"fp32", "bf16"}, result.trials
    for t in result.trials:
        assert _precision_of(result.search_dir / f"trial-{t['number']:04d}") == t["params"]["train.precision"]
