"""Defaults that learn: the automatic plan, early stopping to the best model, the time budget, the
warnings when a run cannot learn, the default search space, in-memory data, and what a finished run keeps."""

import json
import random
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import yaml

import tunesmith
from conftest import TUNESMITH, sentiment_rows, tiny_config
from tunesmith.config import load_config
from tunesmith.schedule import AUTO_MAX_EPOCHS, AUTO_MIN_STEPS, make_plan
from tunesmith.tasks import text_classification as TEXT


def _cfg(**train):
    return load_config({"data": {"train": "x.csv"}, "train": train})


# ---------------------------------------------------------------- the plan

def test_auto_plan_gives_small_data_enough_steps_and_large_data_one_pass():
    small = make_plan(_cfg(), TEXT, train_features=270, validation_examples=30)  # batch 16: 17 steps per epoch
    assert (small.batch_size, small.total_steps, small.epochs) == (16, AUTO_MIN_STEPS, 18)
    assert small.patience == 3 and small.patience_from_step == AUTO_MIN_STEPS // 2
    assert small.eval_every == 30  # 10 evaluations: a validation pass of 30 costs little
    assert "270 training inputs, 17 step(s) per epoch: 18 epoch(s) planned" in small.reason
    tiny = make_plan(_cfg(), TEXT, train_features=40, validation_examples=5)    # 3 steps per epoch
    assert tiny.total_steps == 3 * AUTO_MAX_EPOCHS
    # large data: one and a half passes (more than the minimum of steps)
    medium = make_plan(_cfg(), TEXT, train_features=4799, validation_examples=500)
    assert (medium.batch_size, medium.steps_per_epoch, medium.total_steps) == (16, 300, 450)
    large = make_plan(_cfg(), TEXT, train_features=9479, validation_examples=500)  # batch 32: 297 steps per epoch
    assert (large.batch_size, large.total_steps, large.epochs) == (32, 446, 2)
    assert "9479 training inputs, 297 step(s) per epoch: 1.5 epoch(s) planned" in large.reason
    huge = make_plan(_cfg(), TEXT, train_features=32_000, validation_examples=3000)  # 1,000 steps per epoch
    assert huge.total_steps == 1500 and huge.epochs == 2
    assert huge.eval_every == 375  # evaluation is costly here: 4 evaluations
    explicit = make_plan(_cfg(epochs=2, batch_size=32), TEXT, train_features=270, validation_examples=30)
    assert (explicit.total_steps, explicit.eval_every, explicit.patience) == (18, None, None)
    assert make_plan(_cfg(max_steps=7), TEXT, 270, 30).total_steps == 7


def test_auto_validation_holds_out_a_tenth_and_at_most_500_rows():
    data = _cfg().data
    assert data.validation_fraction == "auto" and data.holds_out
    assert data.validation_share(400) == 0.1 and data.validation_share(5000) == 0.1
    assert data.validation_share(9979) == pytest.approx(500 / 9979)
    explicit = load_config({"data": {"train": "x.csv", "validation_fraction": 0.2}}).data
    assert explicit.validation_share(100_000) == 0.2 and explicit.holds_out
    assert not load_config({"data": {"train": "x.csv", "validation_fraction": 0}}).data.holds_out
    from tunesmith.errors import TunesmithError
    with pytest.raises(TunesmithError, match="validation_fraction: .*expected auto or a share from 0 to below 1"):
        load_config({"data": {"train": "x.csv", "validation_fraction": 1.5}})
    with pytest.raises(TunesmithError) as raised:
        load_config({"data": {"train": "x.csv", "validation_fraction": 1.5}})
    assert str(raised.value).count("(got 1.5)") == 1
    with pytest.raises(TunesmithError, match=r"data\.validation_fraction: Input should be a valid number"):
        load_config({"data": {"train": "x.csv", "validation_fraction": "half"}})


def test_the_auto_validation_split_of_large_data_is_500_rows(tmp_path):
    from tunesmith.tasks import TASKS

    rows = sentiment_rows(6000, seed=4)
    pd.DataFrame(rows).to_csv(tmp_path / "big.csv", index=False)
    splits = TASKS["text_classification"].load_splits(load_config({"data": {"train": str(tmp_path / "big.csv")}}))
    assert (len(splits.train), len(splits.validation)) == (5500, 500)
    grouped = load_config({"data": {"train": str(tmp_path / "big.csv"), "group_column": "film"}})
    splits = TASKS["text_classification"].load_splits(grouped)  # 37 films: whole films, about 500 rows
    assert 300 <= len(splits.validation) <= 700 and len(splits.train) + len(splits.validation) == 6000


def test_tagging_words_gets_more_steps_and_a_larger_rate_than_labelling_texts():
    from tunesmith.tasks import token_classification as TOKENS
    cfg = load_config({"task": "token_classification", "data": {"train": "x.conll"}})
    plan = make_plan(cfg, TOKENS, train_features=1725, validation_examples=192)  # wnut: 108 steps per epoch
    assert (plan.total_steps, plan.lr) == (600, 1e-4)
    assert "at least 600 steps" in plan.reason
    assert make_plan(_cfg(), TEXT, train_features=1725, validation_examples=192).total_steps == AUTO_MIN_STEPS


def test_auto_learning_rate_follows_the_strategy_and_the_batch_size():
    for strategy, lr in (("full", 5e-5), ("lora", 5e-4), ("linear_probe", 2e-3)):
        cfg = load_config({"data": {"train": "x.csv"}, "strategy": {"name": strategy}})
        plan = make_plan(cfg, TEXT, 100, 10)
        assert plan.lr == lr and plan.lr_reason == f"auto for strategy {strategy} at batch 16"
    # large data plans batch 32: full fine-tuning takes twice the step there
    large = make_plan(_cfg(), TEXT, train_features=9000, validation_examples=1000)
    assert (large.batch_size, large.lr, large.lr_reason) == (32, 1e-4, "auto for strategy full at batch 32")
    assert make_plan(_cfg(batch_size=64), TEXT, 100, 10).lr == 1e-4
    lora = load_config({"data": {"train": "x.csv"}, "train": {"batch_size": 64}, "strategy": {"name": "lora"}})
    assert make_plan(lora, TEXT, 100, 10).lr == 5e-4
    assert make_plan(_cfg(lr=3e-5), TEXT, 100, 10).lr == 3e-5


def test_auto_dropout_is_off_for_at_most_one_and_a_half_passes_over_the_data():
    large = make_plan(_cfg(), TEXT, train_features=9479, validation_examples=500)  # 446 steps of 297 a pass
    assert (large.dropout, large.dropout_reason) == (0.0, "auto: 1.5 pass(es) over the data, at most 1.5")
    assert make_plan(_cfg(), TEXT, train_features=4000, validation_examples=400).dropout == 0.0  # 375 steps of 16
    middle = make_plan(_cfg(), TEXT, train_features=2700, validation_examples=300)  # 300 steps of 169 a pass
    assert (middle.dropout, middle.dropout_reason) == (None, "auto: 1.8 passes over the data, more than 1.5")
    assert make_plan(_cfg(), TEXT, train_features=900, validation_examples=100).dropout is None  # 5.3 passes
    assert make_plan(_cfg(epochs=3), TEXT, 9479, 500).dropout is None
    assert make_plan(_cfg(epochs=2), TEXT, 9479, 500).dropout is None
    assert make_plan(_cfg(epochs=1), TEXT, 900, 100).dropout == 0.0
    assert make_plan(_cfg(max_steps=900), TEXT, 9479, 500).dropout is None  # 3 passes
    assert make_plan(_cfg(dropout="model"), TEXT, 9479, 500).dropout is None
    assert make_plan(_cfg(dropout=0.2), TEXT, 900, 100).dropout == 0.2
    assert make_plan(_cfg(dropout=0), TEXT, 900, 100).dropout == 0.0
    from tunesmith.errors import TunesmithError
    with pytest.raises(TunesmithError, match="train.dropout"):
        _cfg(dropout=1.0)


def test_a_plan_of_few_passes_keeps_its_best_model_from_the_second_half(tiny_model_dir, tmp_path, capsys):
    """epochs auto over large data (at most 2 passes): evaluations of the first half are logged, not kept, even
    when they score best; early stopping counts from there. Small data (many passes) keeps any evaluation."""
    plan = make_plan(_cfg(), TEXT, train_features=9479, validation_examples=500)
    assert plan.best_from_step == 223 == plan.patience_from_step
    assert "best model chosen from step 223 on" in plan.reason
    assert make_plan(_cfg(), TEXT, train_features=900, validation_examples=100).best_from_step == 0
    assert make_plan(_cfg(), TEXT, train_features=2700, validation_examples=300).best_from_step == 0  # 1.8 passes
    assert make_plan(_cfg(epochs=1), TEXT, train_features=9479, validation_examples=500).best_from_step == 0
    assert make_plan(_cfg(), TEXT, train_features=9479, validation_examples=0).best_from_step == 0

    # 3,800 training rows at batch 16: 238 steps per epoch, 357 planned (1.5 passes), best model from step 178
    pd.DataFrame(sentiment_rows(4000, seed=9)).to_csv(tmp_path / "train.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "runs", epochs="auto")
    cfg["data"]["validation_fraction"] = 0.05
    result = tunesmith.train(cfg)
    err = capsys.readouterr().err
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert (summary["plan"]["total_steps"], summary["plan"]["best_from_step"]) == (357, 178)
    evals = [line for line in err.splitlines() if ": validation loss" in line]
    steps = [int(line.split("step ")[1].split(":")[0]) for line in evals]
    early = [line for line, step in zip(evals, steps) if step < 178]
    # the very first evaluation would be the best so far, were it a candidate
    assert early and all(line.endswith("(the best model is chosen from step 178 on)") for line in early)
    first_candidate = evals[len(early)]
    assert first_candidate.endswith("(best so far, saved)") and summary["best_step"] >= 178


def test_a_replanned_length_moves_where_early_stopping_and_the_best_model_start():
    """A time budget (or the main process of several) sets a new length: what started at half the plan starts
    at half the new one, down and back up; what started at step 0 stays there."""
    plan = make_plan(_cfg(), TEXT, train_features=9479, validation_examples=500)  # 446 steps, both from 223
    plan.set_total_steps(140)
    assert (plan.total_steps, plan.patience_from_step, plan.best_from_step) == (140, 70, 70)
    plan.set_total_steps(400)  # a slow start's cut, grown back as the pace recovered
    assert (plan.patience_from_step, plan.best_from_step) == (200, 200)
    many = make_plan(_cfg(), TEXT, train_features=900, validation_examples=100)  # many passes: any evaluation
    many.set_total_steps(100)
    assert (many.patience_from_step, many.best_from_step) == (50, 0)
    fixed = make_plan(_cfg(epochs=1), TEXT, train_features=9479, validation_examples=500)
    fixed.set_total_steps(100)
    assert (fixed.patience_from_step, fixed.best_from_step) == (0, 0)


def test_a_time_budget_that_cuts_a_few_pass_plan_chooses_from_the_second_half_of_the_cut(tiny_model_dir, tmp_path,
                                                                                        capsys, monkeypatch):
    """357 steps planned (1.5 passes, best model from step 178); the budget fits 140: the evaluations from
    step 70 on are candidates. (Before, the cut run kept only its last evaluation, and logged every other one
    as 'chosen from step 178 on'.)"""
    from tunesmith import loop
    real_fit = loop._fit_the_budget

    def budget_for_140_steps(lp, note):
        lp.budget.steps_that_fit = lambda elapsed, per_step, reserve: max(0, 140 - lp.state.step)
        real_fit(lp, note)

    monkeypatch.setattr(loop, "_fit_the_budget", budget_for_140_steps)
    pd.DataFrame(sentiment_rows(4000, seed=9)).to_csv(tmp_path / "train.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "runs", epochs="auto",
                      time_limit="1h")
    cfg["data"]["validation_fraction"] = 0.05
    result = tunesmith.train(cfg)
    err = capsys.readouterr().err
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    total = summary["plan"]["total_steps"]  # 140, or 141: a re-plan at step 140 keeps at least one more step
    assert total in (140, 141) and summary["train"]["steps"] == total and summary["plan"]["best_from_step"] == 70
    assert "time limit 1.0h: 140 of the 357 planned steps fit" in err
    evals = [line for line in err.splitlines() if ": validation loss" in line]
    steps = [int(line.split("step ")[1].split(":")[0]) for line in evals]
    assert all(line.endswith("(the best model is chosen from step 70 on)") for line, step in zip(evals, steps) if step < 70)
    candidates = [line for line, step in zip(evals, steps) if 70 <= step < total]
    assert candidates and candidates[0].endswith("(best so far, saved)")  # the first candidate is the best so far
    assert 70 <= summary["best_step"] <= total


@pytest.mark.parametrize("epochs, expected", [(1, 0.0), (3, 0.1)])
def test_the_planned_dropout_is_what_trains_and_the_saved_model_keeps_its_own(tiny_model_dir, sentiment_csv, tmp_path,
                                                                             epochs, expected):
    """Every dropout layer, the attention's included, at the plan's probability while training; model/config.json
    keeps the backbone's (0.1: the tiny BERT's, as BERT's)."""
    import torch

    from tunesmith.loop import fit
    from tunesmith.train import setup

    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs=epochs)
    seen = []

    def on_evaluate(step, metrics):
        seen.append({m.p for m in run.model.modules() if isinstance(m, torch.nn.Dropout)})
        return False
    run = setup(cfg)
    layers = [m for m in run.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(layers) == 2 * 3 + 2  # per block: attention probabilities, attention output, feed-forward; embeddings, head
    fit(run, on_evaluate)
    assert seen and all(ps == {expected} for ps in seen)
    result = tunesmith.train(cfg)
    saved = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == 0.1 and saved["attention_probs_dropout_prob"] == 0.1
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["plan"]["dropout"] == (None if expected == 0.1 else expected)


def test_config_values_as_the_docs_write_them():
    cfg = load_config({"data": {"train": "x.csv"}, "train": {"time_limit": "1h30m"},
                       "strategy": {"name": "freeze", "freeze_layers": 2, "cache_features": False}})
    assert cfg.train.time_limit == 5400 and cfg.strategy.cache_features == "off"
    from tunesmith.errors import TunesmithError
    with pytest.raises(TunesmithError, match="train.time_limit: expected a duration such as 90s, 20m"):
        load_config({"data": {"train": "x.csv"}, "train": {"time_limit": "soon"}})


def test_auto_epochs_train_small_data_and_stop_early(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs="auto")
    result = tunesmith.train(cfg)
    err = capsys.readouterr().err
    assert "plan: 300 optimizer steps (320 training inputs, 20 step(s) per epoch: 15 epoch(s) planned" in err
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["plan"]["stopped"] == "early stopping" and summary["train"]["steps"] < 300
    assert result.metrics["accuracy"] > 0.9
    assert not (result.run_dir / "checkpoints").exists()  # a finished run keeps model/ and logs only
    assert "warning" not in err


def test_refit_trains_again_on_all_rows_keeps_that_model_and_resumes(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs="auto", batch_size="auto", refit=True)
    result = tunesmith.train(cfg)
    err = capsys.readouterr().err
    run = result.run_dir
    summary = json.loads((run / "metrics.json").read_text())
    refit = summary["refit"]
    assert refit["status"] == "done" and refit["rows"] == 400 and refit["steps"] == 300 and refit["batch_size"] == 16
    assert "training again on all 400 rows (train + validation) for 300 steps" in err
    inner = json.loads((run / "refit" / "metrics.json").read_text())
    assert (inner["data"]["train"], inner["data"]["validation"], inner["train"]["steps"]) == (400, 0, 300)
    assert inner["plan"]["lr"] == summary["plan"]["lr"]
    # the run's model, test predictions and test metrics are the refit's; the first run's test score is kept
    assert (run / "model" / "model.safetensors").is_file() and not (run / "refit" / "model").exists()
    assert summary["test"] == inner["test"] and result.metrics == inner["test"]
    assert refit["test_before_refit"]["accuracy"] > 0.9 and result.metrics["accuracy"] > 0.9
    assert result.validation_metrics == summary["validation"]
    preds = pd.read_csv(run / "test_predictions.csv")
    assert (preds["predicted_label"] == preds["label"]).mean() == pytest.approx(result.metrics["accuracy"])
    assert not (run / "checkpoints").exists() and not (run / "refit" / "checkpoints").exists()

    # killed during the refit (before its first checkpoint): --resume trains it again, to the same model
    model_bytes = (run / "model" / "model.safetensors").read_bytes()
    import shutil
    shutil.rmtree(run / "refit")
    summary["refit"] = {k: v for k, v in refit.items() if k in ("steps", "batch_size", "lr", "rows")}
    summary["refit"]["status"] = "pending"
    (run / "metrics.json").write_text(json.dumps(summary))
    resumed = tunesmith.train(None, resume=run)
    assert resumed.metrics == inner["test"]
    assert (run / "model" / "model.safetensors").read_bytes() == model_bytes
    assert json.loads((run / "metrics.json").read_text())["refit"]["status"] == "done"


def test_refit_only_where_the_validation_rows_came_from_the_training_file(tiny_model_dir, sentiment_csv, tmp_path):
    train, test = sentiment_csv
    off = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs="auto", max_steps=20)  # the default
    assert "refit" not in json.loads((tunesmith.train(off).run_dir / "metrics.json").read_text())
    budget = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", max_steps=20, refit=True, time_limit="10m")
    assert "refit" not in json.loads((tunesmith.train(budget).run_dir / "metrics.json").read_text())
    own_file = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs="auto", max_steps=20, refit=True)
    own_file["data"]["validation"] = str(test)
    assert "refit" not in json.loads((tunesmith.train(own_file).run_dir / "metrics.json").read_text())
    explicit = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", refit=True)  # 3 epochs
    summary = json.loads((tunesmith.train(explicit).run_dir / "metrics.json").read_text())
    assert summary["refit"]["status"] == "done" and summary["refit"]["steps"] == 60  # 320 rows, batch 16


def _noisy_rows(n, seed, noise):
    rows, rng = sentiment_rows(n, seed=seed), random.Random(seed)
    for r in rows:
        if rng.random() < noise:
            r["label"] = "pos" if r["label"] == "neg" else "neg"
    return rows


def test_early_stopping_restores_the_best_model(tiny_model_dir, tmp_path):
    pd.DataFrame(_noisy_rows(300, 1, 0.3)).to_csv(tmp_path / "train.csv", index=False)  # overfits: val loss rises
    pd.DataFrame(sentiment_rows(60, seed=3)).to_csv(tmp_path / "val.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "runs", lr=0.01, epochs=30,
                      eval_every_steps=5, early_stopping_patience=3, metric="loss", keep_checkpoints=True)
    cfg["data"]["validation"] = str(tmp_path / "val.csv")
    result = tunesmith.train(cfg)
    log = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["validation"]["loss"] for r in log if r["type"] == "eval"}
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    best, last = summary["best_step"], max(evals)
    assert summary["plan"]["stopped"] == "early stopping" and best < last and evals[best] < evals[last]
    assert (result.run_dir / "checkpoints").is_dir()  # train.keep_checkpoints
    # the saved model is the best step's: its validation loss, recomputed from predictions, is that step's
    preds = tunesmith.predict(result.run_dir, tmp_path / "val.csv", precision="fp32")
    p_true = np.where(preds["label"] == "pos", preds["prob_pos"], preds["prob_neg"])
    assert -np.log(p_true).mean() == pytest.approx(evals[best], abs=1e-4)


# ---------------------------------------------------------------- the time budget

def test_time_limit_stops_within_a_tenth_of_the_budget(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", max_steps=1_000_000, time_limit="12s")
    started = time.perf_counter()
    result = tunesmith.train(cfg)
    seconds = time.perf_counter() - started
    assert 0.9 * 12 <= seconds <= 1.1 * 12, seconds
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    steps, schedule_end = summary["train"]["steps"], summary["plan"]["total_steps"]
    assert steps < 1_000_000 and abs(schedule_end - steps) <= max(5, steps // 20), (steps, schedule_end)  # lr ends ~there
    assert "time limit 12s:" in capsys.readouterr().err and result.metrics["accuracy"] > 0.9


def test_time_limit_counts_across_a_resume(tiny_model_dir, sentiment_csv, tmp_path, cli_env):
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", max_steps=1_000_000, time_limit="20s",
                      checkpoint_every_steps=10)
    cfg["output"]["name"] = "budget"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "runs" / "budget"
    proc = subprocess.Popen(TUNESMITH + ["train", str(tmp_path / "cfg.yaml")], env=cli_env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(run.glob("checkpoints/step-*/state.json")):
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "state.json").read_text())
    spent = state["extra"]["wall_seconds"]
    assert 0 < spent < 20
    started = time.perf_counter()
    tunesmith.train(None, resume=run)
    seconds = time.perf_counter() - started
    assert abs(seconds - (20 - spent)) <= 2.0, (seconds, spent)  # the rest of the budget, within a tenth of it
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["train"]["steps"] > state["step"] and summary["plan"]["stopped"] in ("time limit", "plan")


# ---------------------------------------------------------------- saying when a run cannot learn

def test_warnings_when_a_run_cannot_learn(tiny_model_dir, tmp_path, capsys):
    rows = sentiment_rows(200, seed=1)
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:12:2]).to_csv(tmp_path / "val.csv", index=False)  # 6 rows, all 'pos'
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "runs", epochs=1, lr=1e-7)
    cfg["data"]["validation"] = str(tmp_path / "val.csv")
    tunesmith.train(cfg)
    err = capsys.readouterr().err
    assert "warning: train.epochs 1 gives 13 optimizer steps for 200 training inputs" in err
    assert "warning: the validation split has only 6 examples" in err
    assert "warning: no validation example of 'neg'" in err

    pd.DataFrame(rows[:60]).to_csv(tmp_path / "val.csv", index=False)
    tunesmith.train(tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "runs", epochs=1,
                                lr=1e-9, warmup_ratio=0.0) | {"data": {"train": str(tmp_path / "train.csv"),
                                                                     "validation": str(tmp_path / "val.csv")}})
    err = capsys.readouterr().err
    assert "warning: the best model predicts only '" in err and "on the validation split: it learned nothing" in err
    assert "validation split has only" not in err and "no validation example" not in err


def test_grouped_validation_keeps_every_class(tmp_path):
    from tunesmith.tasks.text_classification import load_splits
    rng = random.Random(0)
    rows = []
    for g in range(60):  # groups of one class each, of very different sizes
        label = "pos" if g % 4 else "neg"
        rows += [{"text": f"text {g} {i}", "label": label, "film": f"f{g}"} for i in range(rng.randint(1, 25))]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    for seed in range(8):
        splits = load_splits(load_config({"data": {"train": str(tmp_path / "train.csv"), "group_column": "film"},
                                          "train": {"seed": seed}}))
        assert set(splits.validation.targets) == {0, 1}, seed
        assert not set(splits.validation.groups) & set(splits.train.groups)


def test_default_search_space(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    train, _ = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, None, tmp_path / "runs")
    cfg["search"] = {"trials": 2, "startup_trials": 2}
    result = tunesmith.search(cfg)
    assert "search.space not given: the default space, train.lr" in capsys.readouterr().err
    for trial in result.trials:
        assert set(trial["params"]) == {"train.lr", "train.epochs", "train.batch_size", "train.warmup_ratio",
                                        "train.weight_decay"}
        assert 2e-3 / 5 <= trial["params"]["train.lr"] <= 2e-3 * 4  # around the config's own rate
    assert result.best_config is not None


# ---------------------------------------------------------------- in-memory data

@pytest.mark.parametrize("kind", ["DataFrame", "list", "Dataset"])
def test_in_memory_data_through_train_evaluate_predict(tiny_model_dir, tmp_path, kind):
    train_rows, test_rows = sentiment_rows(300, seed=1), sentiment_rows(80, seed=2)
    as_kind = {"DataFrame": pd.DataFrame, "list": list,
               "Dataset": lambda rows: __import__("datasets").Dataset.from_list(rows)}[kind]
    cfg = tiny_config(tiny_model_dir, "unused.csv", None, tmp_path / "runs")
    cfg["data"] = {"train": as_kind(train_rows), "test": as_kind(test_rows)}
    result = tunesmith.train(cfg)
    assert result.metrics["accuracy"] > 0.9
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]
    assert saved["train"].startswith(str(result.run_dir / "data" / "train-"))  # a copy the folder owns
    assert len(pd.read_json(saved["train"], lines=True)) == 300
    assert tunesmith.evaluate(result.run_dir, as_kind(test_rows))["accuracy"] == pytest.approx(result.metrics["accuracy"])
    frame = tunesmith.predict(result.run_dir, as_kind(test_rows))
    assert len(frame) == 80 and (frame["predicted_label"] == frame["label"]).mean() > 0.9
    texts = tunesmith.predict(result.run_dir, ["a great and wonderful film", "boring awful acting"])
    assert texts["predicted_label"].tolist() == ["pos", "neg"]


def test_in_memory_data_through_cv_and_search(tiny_model_dir, tmp_path):
    frame = pd.DataFrame(sentiment_rows(120, seed=1))
    cfg = tiny_config(tiny_model_dir, "unused.csv", None, tmp_path / "runs", epochs=2)
    cfg["data"] = {"train": frame}
    cv = tunesmith.cv(cfg, folds=2)
    assert len(cv.folds) == 2 and list((cv.cv_dir / "data").glob("train-*.jsonl"))
    cfg["search"] = {"trials": 1, "space": {"train.lr": {"low": 1e-3, "high": 3e-3, "log": True}}}
    cfg["output"]["name"] = "s"
    first = tunesmith.search(cfg)
    again = tunesmith.search(cfg, trials=2)  # the same data again: the same search, continued
    assert [t["state"] for t in again.trials] == ["complete", "complete"] and first.search_dir == again.search_dir


def test_bad_in_memory_data_names_the_argument_and_row(tiny_model_dir, tmp_path):
    frame = pd.DataFrame(sentiment_rows(50, seed=1), index=range(100, 150))
    frame.loc[117, "text"] = "   "
    cfg = tiny_config(tiny_model_dir, "unused.csv", None, tmp_path / "runs")
    cfg["data"] = {"train": frame}
    with pytest.raises(tunesmith.TunesmithError, match=r"^data.train \(DataFrame\), index 117, column 'text': empty text$"):
        tunesmith.train(cfg)
    rows = sentiment_rows(50, seed=1)
    rows[3] = {"text": "fine", "label": None}
    cfg["data"] = {"train": rows}
    with pytest.raises(tunesmith.TunesmithError, match=r"^data.train \(list\), item 3, column 'label': missing label$"):
        tunesmith.train(cfg)
    cfg["data"] = {"train": [1, 2, 3]}
    with pytest.raises(tunesmith.TunesmithError, match=r"data.train, item 0: expected a dict of column values"):
        tunesmith.train(cfg)
    assert not (tmp_path / "runs").exists()  # nothing half-written
