"""The warm worker (`tunesmith worker start`): commands handed to it by the `tunesmith` command behave as
the same commands run cold (results, exit codes, errors, signals, folders, streams), and a worker never
serves another environment or changed code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import yaml

import tunesmith_launcher
from conftest import sentiment_rows, tiny_config

COMMAND = [str(Path(sys.executable).parent / "tunesmith")]  # the console script: it hands commands over


def test_the_key_follows_the_environment_and_the_code(tmp_path, monkeypatch):
    package = tmp_path / "tunesmith"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(tunesmith_launcher, "find_spec", lambda name: _spec(package))
    env = {"HOME": "/home/u", "PATH": "/usr/bin", "OMP_NUM_THREADS": "2"}
    key = tunesmith_launcher.environment_key(env)
    assert tunesmith_launcher.environment_key(env) == key
    # what differs between shells, and what tunesmith sets itself at its default value: the same key
    assert tunesmith_launcher.environment_key({**env, "PWD": "/x", "OLDPWD": "/y", "SHLVL": "3", "_": "z"}) == key
    assert tunesmith_launcher.environment_key({**env, "MAKEFLAGS": "", "MFLAGS": "", "MAKELEVEL": "1"}) == key
    assert tunesmith_launcher.environment_key({**env, "TRANSFORMERS_VERBOSITY": "error"}) == key
    # a variable that may change what a process imports or how: another key
    assert tunesmith_launcher.environment_key({**env, "OMP_NUM_THREADS": "1"}) != key
    assert tunesmith_launcher.environment_key({**env, "TRANSFORMERS_VERBOSITY": "info"}) != key
    assert tunesmith_launcher.environment_key({**env, "PYTHONPATH": "/src"}) != key
    # changed code (a git pull, an edit): another key
    os.utime(package / "a.py", ns=(1, 1))
    assert tunesmith_launcher.environment_key(env) != key


def _spec(package: Path) -> ModuleSpec:
    spec = ModuleSpec("tunesmith", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    return spec


@pytest.fixture(scope="module")
def worker_env(tiny_model_dir, tmp_path_factory):
    """A worker of its own (short socket folder: Unix socket paths are limited to about 100 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="tsw-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # PYTEST_CURRENT_TEST changes
    env.update(TUNESMITH_WORKER_DIR=str(folder / "w"), TUNESMITH_CACHE=str(tmp_path_factory.mktemp("cache")),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    started = subprocess.run(COMMAND + ["worker", "start", "--idle-minutes", "10"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 0 and "worker ready" in started.stderr, started.stderr
    yield env
    subprocess.run(COMMAND + ["worker", "stop"], env=env, capture_output=True, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def _write_config(tiny_model_dir, folder: Path, **train) -> Path:
    import pandas as pd

    pd.DataFrame(sentiment_rows(400, seed=1)).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(120, seed=2)).to_csv(folder / "test.csv", index=False)
    cfg = tiny_config(tiny_model_dir, Path("train.csv"), Path("test.csv"), Path("runs"), **train)  # relative paths
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "cfg.yaml"


def test_a_warm_command_trains_exactly_like_a_cold_one(worker_env, tiny_model_dir, tmp_path):
    _write_config(tiny_model_dir, tmp_path)
    runs = {}
    for name, extra_env in (("warm", {}), ("cold", {"TUNESMITH_WORKER": "0"})):
        done = subprocess.run(COMMAND + ["train", "cfg.yaml", f"--output.name={name}"], cwd=tmp_path,
                              env={**worker_env, **extra_env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"run folder runs/{name}" in done.stderr  # the child wrote to this command's stderr
        runs[name] = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
    warm, cold = runs["warm"], runs["cold"]
    assert warm["warm_worker"] is True and cold["warm_worker"] is False
    assert warm["test"] == cold["test"] and warm["best_step"] == cold["best_step"]
    assert warm["timing"]["before_train"] < cold["timing"]["before_train"]  # no imports: the point of it
    assert (tmp_path / "runs" / "warm" / "test_predictions.csv").read_text() == \
        (tmp_path / "runs" / "cold" / "test_predictions.csv").read_text()


def test_a_warm_command_reports_a_bad_input_as_a_cold_one(worker_env, tmp_path):
    (tmp_path / "bad.yaml").write_text("task: text_classification\ndata:\n  train: missing.csv\n")
    warm = subprocess.run(COMMAND + ["train", "bad.yaml"], cwd=tmp_path, env=worker_env, capture_output=True,
                          text=True, timeout=120)
    cold = subprocess.run(COMMAND + ["train", "bad.yaml"], cwd=tmp_path, env={**worker_env, "TUNESMITH_WORKER": "0"},
                          capture_output=True, text=True, timeout=120)
    assert warm.returncode == cold.returncode == 2
    assert warm.stderr == cold.stderr and warm.stderr.startswith("error: ") and warm.stderr.count("\n") == 1
    assert "Traceback" not in warm.stderr


def test_help_and_a_usage_error_end_warm_as_cold(worker_env, tmp_path):
    for argv, code in ((["--help"], 0), (["train", "--help"], 0), (["train"], 2)):
        warm, cold = (subprocess.run(COMMAND + argv, cwd=tmp_path, env={**worker_env, **extra}, capture_output=True,
                                     text=True, timeout=120) for extra in ({}, {"TUNESMITH_WORKER": "0"}))
        assert warm.returncode == cold.returncode == code, (argv, warm.stderr)
        assert (warm.stdout, warm.stderr) == (cold.stdout, cold.stderr), argv
        assert warm.stdout or warm.stderr


def test_ctrl_c_reaches_the_warm_command_and_it_checkpoints(worker_env, tiny_model_dir, tmp_path):
    _write_config(tiny_model_dir, tmp_path, epochs=400, checkpoint_every_steps=5)
    run = tmp_path / "runs" / "stopped"
    proc = subprocess.Popen(COMMAND + ["train", "cfg.yaml", "--output.name=stopped"], cwd=tmp_path, env=worker_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(lambda: (run / "checkpoints" / "latest").is_file(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "error: interrupted (SIGINT) at step " in err and err.endswith("--resume runs/stopped\n")


def test_ctrl_z_stops_the_warm_command_and_fg_resumes_it(worker_env, tiny_model_dir, tmp_path):
    _write_config(tiny_model_dir, tmp_path, epochs=400, checkpoint_every_steps=5)
    run = tmp_path / "runs" / "paused"
    proc = subprocess.Popen(COMMAND + ["train", "cfg.yaml", "--output.name=paused"], cwd=tmp_path, env=worker_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(lambda: (run / "checkpoints" / "latest").is_file(), proc)
    child = int((run / ".lock").read_text().split()[0])

    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    os.killpg(proc.pid, signal.SIGTSTP)  # what Ctrl-Z sends: to the command's process group
    _wait_for(lambda: state(proc.pid) == "T" and state(child) == "T")
    os.killpg(proc.pid, signal.SIGCONT)  # fg
    _wait_for(lambda: state(child) != "T")
    latest = (run / "checkpoints" / "latest").read_text()
    _wait_for(lambda: (run / "checkpoints" / "latest").read_text() != latest, proc)  # it trains on
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]


def test_a_warm_command_whose_caller_dies_stops_cleanly(worker_env, tiny_model_dir, tmp_path):
    """The caller killed outright (its terminal gone): the child is sent SIGTERM, checkpoints and stops."""
    _write_config(tiny_model_dir, tmp_path, epochs=400, checkpoint_every_steps=5)
    run = tmp_path / "runs" / "orphan"
    proc = subprocess.Popen(COMMAND + ["train", "cfg.yaml", "--output.name=orphan"], cwd=tmp_path, env=worker_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (run / "checkpoints" / "latest").is_file(), proc)
    child = int((run / ".lock").read_text().split()[0])  # the lock names the process training
    assert child != proc.pid
    proc.kill()
    proc.wait()
    _wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2])
    assert not (run / "metrics.json").exists() and (run / "checkpoints" / "latest").is_file()


def test_worker_status_then_stop(worker_env, tmp_path):  # the last test of this file: it stops the worker
    status = subprocess.run(COMMAND + ["worker", "status"], env=worker_env, capture_output=True, text=True)
    assert "this environment and code: worker pid" in status.stderr
    other = subprocess.run(COMMAND + ["worker", "status"], env={**worker_env, "OMP_NUM_THREADS": "2"},
                           capture_output=True, text=True)
    assert "no worker" in other.stderr and "1 other worker(s)" in other.stderr
    folder = Path(worker_env["TUNESMITH_WORKER_DIR"])
    assert len(list(folder.glob("*.sock"))) == 1
    stopped = subprocess.run(COMMAND + ["worker", "stop"], env=worker_env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and "worker stopped" in stopped.stderr
    _wait_for(lambda: not list(folder.iterdir()), seconds=30)  # its socket and its empty log are gone
    again = subprocess.run(COMMAND + ["worker", "status"], env=worker_env, capture_output=True, text=True)
    assert "no worker" in again.stderr


def test_auto_starts_a_worker_for_the_commands_after_it(tiny_model_dir, tmp_path):
    folder = Path(tempfile.mkdtemp(prefix="tsw-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(TUNESMITH_WORKER="auto", TUNESMITH_WORKER_DIR=str(folder / "w"), OMP_NUM_THREADS="1",
               TUNESMITH_CACHE=str(tmp_path / "cache"))
    _write_config(tiny_model_dir, tmp_path)
    try:
        first = subprocess.run(COMMAND + ["train", "cfg.yaml", "--output.name=first"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-3000:]
        _wait_for(lambda: list((folder / "w").glob("*.sock")), seconds=300)  # started beside the first command
        second = subprocess.run(COMMAND + ["train", "cfg.yaml", "--output.name=second"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        metrics = [json.loads((tmp_path / "runs" / n / "metrics.json").read_text()) for n in ("first", "second")]
        assert [m["warm_worker"] for m in metrics] == [False, True]
        assert metrics[0]["test"] == metrics[1]["test"]
    finally:
        subprocess.run(COMMAND + ["worker", "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def _worker_pid(env: dict) -> int | None:
    status = subprocess.run(COMMAND + ["worker", "status"], env=env, capture_output=True, text=True).stderr
    return int(status.split("worker pid ")[1].split()[0]) if "worker pid " in status else None


def _wait_for(condition, proc: subprocess.Popen | None = None, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended (exit code {proc.returncode}) before the condition held")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)
