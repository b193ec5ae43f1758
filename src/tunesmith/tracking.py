"""Experiment tracking (config `tracking: [tensorboard, mlflow]`): when a run, cv or search finishes,
its metrics (every logged step), its resolved config as parameters and its report go to the trackers.

They are sent from the folder's own files once it has finished (metrics.jsonl, metrics.json, cv.json,
search.json), with the libraries directly: the training loop stays free of tracker calls, a tracker that
is down cannot slow or break training, and `tunesmith report`'s numbers and the tracker's are the same.
The cost: curves appear in the tracker at the end of the run, not while it trains.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from . import report_data as rd
from .config import Config
from .runlog import log, warn

EXPERIMENT = "tunesmith"
MLFLOW_BATCH = 100  # MLflow's log_batch takes at most 100 parameters (and 1,000 metrics) per call


def track_after(folder: Path, cfg: Config, report: Path | None) -> None:
    """track(), with any failure (a server down, a bad URI) a warning: the run has finished anyway."""
    for tracker in dict.fromkeys(cfg.tracking):
        try:
            where = TRACKERS[tracker](folder, cfg, report)
            log(f"{tracker}: logged {folder.name} to {where}")
        except Exception as exc:  # noqa: BLE001 — tracking is a copy of what the folder holds
            warn(f"{tracker}: could not log {folder} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")


def series(run: rd.RunData) -> list[tuple[str, float, int]]:
    """(name, value, step) of everything a tracker shows as a metric, from the folder's files."""
    out: list[tuple[str, float, int]] = []
    if run.kind == "run":
        curves = rd.curves(run.records)
        out += [("train/loss", v, s) for s, v in curves["loss"]] + [("train/lr", v, s) for s, v in curves["lr"]]
        for metric, points in curves["validation"].items():
            out += [(f"validation/{metric}", v, s) for s, v in points]
        last = (run.summary.get("train") or {}).get("steps", 0)
        out += [(f"test/{m}", v, last) for m, v in rd.scalars(run.summary.get("test") or {}).items()]
        speed = (run.summary.get("train") or {}).get("samples_per_second")
        if speed is not None:
            out.append(("train/samples_per_second", speed, last))
    elif run.kind == "cv":
        for fold, metrics in enumerate(run.summary.get("per_fold") or [], start=1):
            out += [(f"fold/{m}", v, fold) for m, v in rd.scalars(metrics).items()]
        for key, prefix in (("mean", "cv_mean"), ("std_dev", "cv_std"), ("pooled_out_of_fold", "cv_pooled"),
                            ("test_ensemble", "test")):
            out += [(f"{prefix}/{m}", v, 0) for m, v in rd.scalars(run.summary.get(key) or {}).items()]
    else:
        trials = rd.trial_values(run)
        out += [("trial/value", v, n) for n, v in zip(trials["number"], trials["value"])]
        out += [("trial/best_so_far", v, n) for n, v in zip(trials["number"], trials["best_so_far"])]
        out += [(f"importance/{p}", v, 0) for p, v in rd.importance(run).items()]
    return [(name, float(v), int(s)) for name, v, s in out if isinstance(v, (int, float)) and math.isfinite(v)]


def params(run: rd.RunData) -> dict[str, str]:
    """The resolved config, one parameter per key (train.lr, model.name, ...)."""
    return {k: "" if v is None else str(v) for k, v in rd.flatten(run.config).items()}


# ---------------------------------------------------------------- MLflow

def default_mlflow_uri(cfg: Config) -> str:
    """A local file store beside the runs: <output.dir>/mlruns."""
    return (Path(cfg.output.dir).resolve() / "mlruns").as_uri()


def to_mlflow(folder: Path, cfg: Config, report: Path | None) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = cfg.tracking_uri or default_mlflow_uri(cfg)
    if urlparse(uri).scheme in ("", "file"):  # a folder: MLflow's file store
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set; a local
        # store needs no server and starts at once (a new SQLite store spends ~13 s creating its tables)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    run = rd.load_folder(folder)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    created = client.create_run(experiment_id, run_name=folder.name,
                                tags={"tunesmith.kind": run.kind, "tunesmith.folder": str(folder.resolve()),
                                      "tunesmith.task": str(run.config.get("task", ""))})
    run_id = created.info.run_id
    try:
        now = int(time.time() * 1000)
        items = [Param(k, v[:6000]) for k, v in params(run).items()]  # MLflow's limit on a value's length
        for i in range(0, len(items), MLFLOW_BATCH):
            client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH])
        metrics = [Metric(name, value, now, step) for name, value, step in series(run)]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.log_batch(run_id, tags=[RunTag("tunesmith.config", yaml.safe_dump(run.config, sort_keys=False)[:5000])])
        if report is not None and report.is_file():
            client.log_artifact(run_id, str(report))
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return f"{uri} (experiment {EXPERIMENT}, run {run_id})"


# ---------------------------------------------------------------- TensorBoard

def tensorboard_dir(folder: Path, cfg: Config) -> Path:
    return Path(cfg.output.dir) / "tensorboard" / folder.name


def to_tensorboard(folder: Path, cfg: Config, report: Path | None) -> str:
    from torch.utils.tensorboard import SummaryWriter

    run, log_dir = rd.load_folder(folder), tensorboard_dir(folder, cfg)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for name, value, step in series(run):
            writer.add_scalar(name, value, step)
        config = yaml.safe_dump(run.config, sort_keys=False)
        writer.add_text("config", "    " + config.replace("\n", "\n    "))  # markdown: an indented block
        if report is not None and report.is_file():  # TensorBoard has no artifacts: the report sits beside the events
            shutil.copyfile(report, log_dir / report.name)
            writer.add_text("report", f"report: {log_dir / report.name}")
    finally:
        writer.close()
    return str(log_dir)


TRACKERS = {"mlflow": to_mlflow, "tensorboard": to_tensorboard}
