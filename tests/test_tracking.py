"""Tracking: a finished run logged to TensorBoard and to MLflow (a local file store, and a real MLflow
tracking server started on loopback), read back with each library's own reader; a tracker that is down
is a warning; what cv and search folders send."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_config

import tunesmith
from tunesmith.config import load_config
from tunesmith.report_data import RunData
from tunesmith.tracking import series, track_after

MLFLOW = Path(sys.executable).with_name("mlflow")
SERVER_START_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port. Started when the module starts: it needs ~10 s to
    come up, which the first test's training overlaps."""
    if not MLFLOW.is_file():
        yield None
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    log = (root / "log").open("w")
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", (root / "store").as_uri(),
                             "--artifacts-destination", str(root / "artifacts")],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the server and its uvicorn child
    yield {"proc": proc, "url": f"http://127.0.0.1:{port}", "log": root / "log"}
    os.killpg(proc.pid, signal.SIGKILL)  # a test server: nothing to shut down gracefully (SIGTERM took 4 s)
    proc.wait()
    log.close()


def _wait_for(server) -> bool:
    import urllib.request

    deadline = time.time() + SERVER_START_SECONDS
    while time.time() < deadline and server["proc"].poll() is None:
        try:
            with urllib.request.urlopen(server["url"] + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """A tiny run that logs itself to TensorBoard and to MLflow's default local store as it finishes."""
    import pandas as pd
    from conftest import sentiment_rows

    root = tmp_path_factory.mktemp("tracked")
    pd.DataFrame(sentiment_rows(160, seed=1)).to_csv(root / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(40, seed=2)).to_csv(root / "test.csv", index=False)
    cfg = tiny_config(tiny_model_dir, root / "train.csv", root / "test.csv", root / "runs", epochs=2)
    cfg.update({"report": True, "tracking": ["tensorboard", "mlflow"]})
    cfg["output"]["name"] = "tracked"
    return tunesmith.train(cfg).run_dir


def _mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tunesmith")
    found = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(found) == 1
    return client, found[0]


def _check_mlflow(client, run, run_dir: Path) -> None:
    summary = json.loads((run_dir / "metrics.json").read_text())
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["model.max_length"] == "32"
    assert run.data.params["task"] == "text_classification" and run.data.tags["tunesmith.kind"] == "run"
    history = client.get_metric_history(run.info.run_id, "validation/macro_f1")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["validation"]["macro_f1"]) for r in evals]
    assert run.data.metrics["test/accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == summary["train"]["steps"]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.html"]


def test_a_run_logs_to_tensorboard_and_the_local_mlflow_store(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tracked_run.parent
    client, run = _mlflow_run((runs / "mlruns").as_uri(), "tracked")
    _check_mlflow(client, run, tracked_run)

    events = EventAccumulator(str(runs / "tensorboard" / "tracked"))
    events.Reload()
    summary = json.loads((tracked_run / "metrics.json").read_text())
    assert {"train/loss", "train/lr", "validation/loss", "validation/macro_f1", "test/accuracy"} <= \
        set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/lr")] == list(range(1, summary["train"]["steps"] + 1))
    assert events.Scalars("test/accuracy")[0].value == pytest.approx(summary["test"]["accuracy"])
    assert (runs / "tensorboard" / "tracked" / "report.html").read_text() == (tracked_run / "report.html").read_text()


def test_a_real_mlflow_server_on_loopback(tracked_run, mlflow_server, tmp_path, capsys):
    if mlflow_server is None:
        pytest.skip(f"no mlflow command at {MLFLOW}")
    if not _wait_for(mlflow_server):
        pytest.skip(f"mlflow server did not start: {mlflow_server['log'].read_text()[-500:]}")
    cfg = load_config(tracked_run / "config.yaml", {"tracking": ["mlflow"], "tracking_uri": mlflow_server["url"]},
                      saved=True)
    track_after(tracked_run, cfg, tracked_run / "report.html")
    assert f"mlflow: logged tracked to {mlflow_server['url']}" in capsys.readouterr().err
    client, run = _mlflow_run(mlflow_server["url"], "tracked")
    _check_mlflow(client, run, tracked_run)
    downloaded = client.download_artifacts(run.info.run_id, "report.html", str(tmp_path))
    assert Path(downloaded).read_text() == (tracked_run / "report.html").read_text()


def test_a_tracker_that_is_down_is_a_warning(tracked_run, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = load_config(tracked_run / "config.yaml", {"tracking": ["mlflow"], "tracking_uri": url}, saved=True)
    track_after(tracked_run, cfg, None)
    err = capsys.readouterr().err
    assert f"warning: mlflow: could not log {tracked_run} (" in err and len(err.strip().splitlines()) == 1


def test_cv_and_search_folders_send_their_summaries():
    cv = RunData(None, "cv", {}, {"per_fold": [{"accuracy": 0.8}, {"accuracy": 0.6}], "mean": {"accuracy": 0.7},
                                  "std_dev": {"accuracy": float("nan")}, "pooled_out_of_fold": {"accuracy": 0.7}})
    assert series(cv) == [("fold/accuracy", 0.8, 1), ("fold/accuracy", 0.6, 2), ("cv_mean/accuracy", 0.7, 0),
                          ("cv_pooled/accuracy", 0.7, 0)]  # NaN (one fold) is not sent
    search = RunData(None, "search", {}, {"direction": "maximize", "importance": {"train.lr": 1.0},
                                          "trials": [{"number": 0, "state": "complete", "value": 0.5},
                                                     {"number": 1, "state": "complete", "value": 0.7}]})
    assert series(search) == [("trial/value", 0.5, 0), ("trial/value", 0.7, 1), ("trial/best_so_far", 0.5, 0),
                              ("trial/best_so_far", 0.7, 1), ("importance/train.lr", 1.0, 0)]
