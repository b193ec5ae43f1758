"""Fixed costs a user waits for (issue 20): what a text run imports, the checkpoints a finished run never
needed, and the timing a run reports in metrics.json."""

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunesmith
from conftest import tiny_config
from tunesmith import loop
from tunesmith.tasks import TASKS
from tunesmith.timing import format_seconds, process_seconds

train_module = importlib.import_module("tunesmith.train")  # tunesmith.train is the function
SRC = str(Path(tunesmith.__file__).resolve().parents[1])


def test_a_text_run_imports_no_image_or_peft_library_until_the_image_task_is_asked_for():
    code = ("import sys, tunesmith, tunesmith.cli; from tunesmith.tasks import TASKS; "
            "TASKS['text_classification']; TASKS['token_classification']; print(' '.join(sys.modules)); "
            "TASKS['image_classification']; print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    text_run, image_task = out.stdout.splitlines()[-2:]
    loaded = {name.split(".")[0] for name in text_run.split()}
    assert "tunesmith" in loaded and "transformers" in loaded
    assert not loaded & {"torchvision", "timm", "optuna", "peft"}, loaded & {"torchvision", "timm", "optuna", "peft"}
    assert image_task == "True"  # the image task still imports its libraries when asked for


def test_the_registry_is_a_mapping_of_every_task_module():
    assert sorted(TASKS) == ["causal_lm", "image_classification", "language_modeling", "text_classification",
                             "token_classification"]
    assert len(TASKS) == 5 and "text_classification" in TASKS and "regression" not in TASKS
    assert all(TASKS[name].NAME == name for name in TASKS)
    with pytest.raises(KeyError):
        TASKS["regression"]


def test_process_seconds_counts_from_the_start_of_the_process():
    timing_py = Path(SRC) / "tunesmith" / "timing.py"  # loaded alone: a fast child, whatever the machine's load
    code = ("import importlib.util, time; time.sleep(0.3); "
            f"spec = importlib.util.spec_from_file_location('timing', {str(timing_py)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.process_seconds())")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0.3 <= float(out.stdout) <= time.perf_counter() - started + 0.02  # /proc counts in 10 ms ticks
    assert process_seconds() > 0
    assert format_seconds({"read_data": 0.31, "load_model": 1.25}) == "read data 0.3s, load model 1.2s"


def _count_checkpoints(monkeypatch) -> list[int]:
    steps: list[int] = []
    real = loop.save_checkpoint

    def counting(run_dir, model, optimizer, scheduler, state, *rest):
        steps.append(state.step)
        return real(run_dir, model, optimizer, scheduler, state, *rest)

    monkeypatch.setattr(loop, "save_checkpoint", counting)
    return steps


@pytest.mark.parametrize("keep", [False, True])
def test_the_end_of_the_plan_writes_a_checkpoint_only_when_it_is_kept(tiny_model_dir, sentiment_csv, tmp_path,
                                                                       monkeypatch, keep):
    train, test = sentiment_csv
    steps = _count_checkpoints(monkeypatch)
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", max_steps=10, checkpoint_every_steps=4,
                      eval_every_steps=5, keep_checkpoints=keep)
    result = tunesmith.train(cfg)
    assert steps == ([4, 8, 10] if keep else [4, 8])
    assert (result.run_dir / "checkpoints").is_dir() == keep


def test_a_time_limit_stop_keeps_its_last_checkpoint(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    train, test = sentiment_csv
    steps = _count_checkpoints(monkeypatch)
    monkeypatch.setattr(loop, "_out_of_time", lambda lp: lp.state.step >= 7)  # the budget runs out at step 7
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", max_steps=10, checkpoint_every_steps=4,
                      eval_every_steps=5, time_limit="1h")
    tunesmith.train(cfg)
    assert steps == [4, 7]


def test_killed_after_training_without_a_last_checkpoint_resumes_to_the_same_result(tiny_model_dir, sentiment_csv,
                                                                                     tmp_path, monkeypatch):
    """A kill while the test predictions are written: the resume trains the steps after the last periodic
    checkpoint again and ends exactly like the uninterrupted run."""
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", max_steps=10, checkpoint_every_steps=4,
                      eval_every_steps=5)
    reference = tunesmith.train({**cfg, "output": {**cfg["output"], "name": "reference"}})

    real_write = train_module.write_frame_atomic

    def killed(frame, path):
        raise KeyboardInterrupt  # stands for a SIGKILL: nothing after this point happens

    monkeypatch.setattr(train_module, "write_frame_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        tunesmith.train({**cfg, "output": {**cfg["output"], "name": "killed"}})
    run = tmp_path / "runs" / "killed"
    assert not (run / "metrics.json").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    monkeypatch.setattr(train_module, "write_frame_atomic", real_write)
    resumed = tunesmith.train(None, resume=run)
    got, ref = (json.loads((r / "metrics.json").read_text()) for r in (run, reference.run_dir))
    assert got["train"]["steps"] == ref["train"]["steps"] == 10 and got["best_step"] == ref["best_step"]
    assert resumed.metrics["accuracy"] == pytest.approx(reference.metrics["accuracy"], abs=1e-9)
    assert (run / "test_predictions.csv").read_text() == (reference.run_dir / "test_predictions.csv").read_text()


def test_metrics_json_says_where_the_time_outside_training_went(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", max_steps=6, checkpoint_every_steps=3)
    result = tunesmith.train(cfg)
    timing = json.loads((result.run_dir / "metrics.json").read_text())["timing"]
    assert set(timing) == {"before_train", "read_data", "load_model", "encode", "setup", "first_step", "checkpoints",
                           "test", "process_at_finish"}
    assert all(v >= 0 for v in timing.values()) and timing["checkpoints"] > 0 and timing["test"] > 0
    assert timing["first_step"] >= timing["setup"] >= timing["read_data"] + timing["load_model"] + timing["encode"] - 0.05
    assert timing["process_at_finish"] >= timing["before_train"] + timing["first_step"] - 0.05
    assert "tunesmith: time outside training: first training step " in capsys.readouterr().err


def test_a_text_run_never_imports_peft(tiny_model_dir, sentiment_csv, tmp_path):
    """peft (and the transformers generation code it pulls in) costs 2.47 CPU s; only LoRA needs it."""
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, None, tmp_path / "runs", max_steps=2)
    code = f"import json, sys, tunesmith; tunesmith.train(json.loads({json.dumps(json.dumps(cfg))})); " \
           "print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"


def test_is_peft_knows_a_lora_model(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.layouts import is_peft

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    assert not is_peft(model)
    from peft import LoraConfig, get_peft_model
    assert is_peft(get_peft_model(model, LoraConfig(r=2, target_modules=["query"])))
    assert not is_peft(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2))


def test_the_command_leaves_without_the_interpreters_teardown(monkeypatch, capsys):
    """`tunesmith` skips Python's teardown (2 s after a demo run had written everything), but first lets other
    threads finish, runs the exit handlers and flushes its output, and exits with main()'s code."""
    import threading

    from tunesmith import cli
    events = []

    def late_writer():
        time.sleep(0.2)
        events.append("thread done")

    def main():
        threading.Thread(target=late_writer).start()
        print("answer", end="")  # no newline: still in the buffer
        return 2
    monkeypatch.setattr(cli, "main", main)
    monkeypatch.setattr(cli.atexit, "_run_exitfuncs", lambda: events.append("exit handlers"))
    monkeypatch.setattr(cli.sys.stdout, "flush", lambda: events.append("flushed"))

    def fake_exit(code):
        events.append(("exit", code))
        raise SystemExit(code)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        cli.run()
    assert events == ["thread done", "exit handlers", "flushed", ("exit", 2)]


def test_the_command_and_python_m_exit_with_mains_code(tmp_path):
    missing = tmp_path / "missing.yaml"
    for cmd in ([sys.executable, "-m", "tunesmith", "train", str(missing)],
                [sys.executable, "-c", "from tunesmith.cli import run; run()", "train", str(missing)]):
        out = subprocess.run(cmd, capture_output=True, text=True, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
        assert out.returncode == 2 and "missing.yaml" in out.stderr and out.stderr.endswith("\n"), out.stderr
