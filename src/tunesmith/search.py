"""Hyperparameter search with Optuna: TPE sampling, median pruning, a resumable shared study.

The space is declared in the config (`search.space`, every key a real config key). Each trial is an
ordinary training run (or a cross-validation, with search.objective: cv) in the search folder:

    runs/<name>/
      config.yaml          the base config of the search
      study.db             the Optuna study (SQLite) unless search.storage names another database
      trial-0000/ ...      each trial's run folder: config, metrics (model/ only with search.keep_models)
      trials.csv           number, state, value, seconds and parameters of every trial
      best_config.yaml     the best trial's full config, ready for `tunesmith train`
      search.json          summary: best trial, parameter importance

The study lives in the database, and a trial is written there the moment it finishes: a killed
search loses only the trials that were running. Running the same command again (or --resume DIR)
continues until search.trials trials are finished (complete or pruned); the trials a killed worker
left RUNNING are marked failed and their parameters queued again. Ctrl-C or SIGTERM stops the search
after the running trial's current step; that trial is queued again (shown as 'interrupted') and
`tunesmith search --resume DIR` continues. Several workers (processes or machines) given the same
storage and config share one study.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import distributed, inputs
from .atomic import write_text_atomic
from .config import Config, SearchParam, StrategyConfig, apply_overrides, deep_copy, config_to_yaml, load_config
from .errors import Interrupted, Terminated, TunesmithError
from .cv import fold_indices, new_folder
from .evaluate import LOWER_IS_BETTER
from .inference import write_frame_atomic
from .models import resolve_model
from .tasks import TASKS
from .runlog import log
from .tasks.base import resolve_data_config
from .schedule import auto_steps, resolve_batch_size, resolve_lr
from .train import publish, train

# A worker writes a heartbeat this often; a RUNNING trial whose heartbeat is older than the grace
# period belonged to a dead worker (on any machine) and is failed and retried by the next worker.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
SQLITE_TIMEOUT_SECONDS = 120  # workers wait this long for the SQLite lock instead of failing
STORAGE_ATTEMPTS = 5
MAX_FAILURES_IN_A_ROW = 3


@dataclass
class SearchResult:
    search_dir: Path
    study_name: str
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Path | None     # best_config.yaml, None when no trial completed
    trials: list[dict]           # number, state, value, seconds, params
    importance: dict[str, float] | None


class _TrialFailed(Exception):
    """A trial that ran but gave no usable value (e.g. an undefined metric): recorded as failed."""


def search(config: str | Path | dict | Config | None, overrides: dict[str, Any] | None = None, *,
           trials: int | None = None, storage: str | None = None, resume: str | Path | None = None) -> SearchResult:
    """Run (or continue) the search the config declares; returns the trials and the best config."""
    import optuna

    distributed.one_process_only("search")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own progress line per trial says it
    with inputs.in_memory_data(config, overrides) as (config, overrides):
        return _search(config, overrides, trials, storage, resume)


def _search(config, overrides, trials, storage, resume) -> SearchResult:
    import optuna

    extra = dict(overrides or {})
    if trials is not None:
        extra["search.trials"] = trials
    if storage is not None:
        extra["search.storage"] = storage
    if resume is not None:
        saved = Path(resume) / "config.yaml"
        if not saved.is_file():
            raise TunesmithError(f"{resume}: not a tunesmith search folder (no config.yaml)")
        cfg = load_config(saved, extra, saved=True)
        search_dir = Path(resume)
    else:
        cfg = load_config(config, extra)
        stem = cfg.data.dataset or inputs.stem(cfg.data.train)
        search_dir = Path(cfg.output.dir) / (cfg.output.name or f"{stem}-search")
    scfg = cfg.search
    study_name = search_dir.name
    task = TASKS[cfg.task]

    # ---- every input check before anything is written
    base_raw = cfg.model_dump(mode="json")
    _check_space(base_raw, scfg.space)
    resolve_model(cfg.model.name)
    splits = task.load_splits(cfg)
    space = scfg.space or default_space(cfg, len(splits.train))
    if scfg.objective == "validation" and splits.validation is None:
        raise TunesmithError("search.objective 'validation' needs a validation split "
                             "(data.validation or data.validation_fraction > 0)")
    if scfg.objective == "cv":
        all_rows = task.load_splits(load_config(cfg, {"data.validation_fraction": 0.0})).train
        fold_indices(task, all_rows, splits.labels, cfg.cv.folds, cfg.train.seed,
                     inputs.shown(resolve_data_config(cfg.data).train))
    metric = task.default_metric(splits.labels) if cfg.train.metric == "auto" else cfg.train.metric
    saved_config = search_dir / "config.yaml"
    comparable = lambda c: {**c.model_dump(), "search": c.search.model_dump(exclude={"trials"})}  # noqa: E731
    in_folder = inputs.persist(cfg, search_dir, write=False)  # in-memory data: its copy in the search folder
    if saved_config.is_file() and comparable(load_config(saved_config, saved=True)) != comparable(in_folder):
        raise TunesmithError(f"{search_dir} holds a search of a different config; continue it with "
                             f"--resume {search_dir}, or set output.name for a new search")

    # no exists() check first: two workers starting together would both see no folder, and the
    # second mkdir would fail (seen in the test suite under load)
    created = new_folder(search_dir, exist_ok=True)
    url = scfg.storage or f"sqlite:///{(search_dir / 'study.db').resolve()}"
    try:
        cfg = inputs.persist(cfg, search_dir)
        base_raw = cfg.model_dump(mode="json")  # trials read the data from the search folder's copy
        if not saved_config.is_file() or resume is not None:
            write_text_atomic(saved_config, config_to_yaml(cfg))
        with _database_errors(url):
            store = _storage(url)
            study = optuna.create_study(
                storage=store, study_name=study_name, load_if_exists=True,
                direction="minimize" if metric in LOWER_IS_BETTER else "maximize",
                sampler=optuna.samplers.TPESampler(seed=scfg.seed + len(_trials_of(store, study_name)),
                                                   n_startup_trials=scfg.startup_trials),
                pruner=optuna.pruners.MedianPruner(n_startup_trials=scfg.startup_trials,
                                                   n_warmup_steps=scfg.pruning_warmup_steps)
                if scfg.pruning else optuna.pruners.NopPruner())
            _requeue_dead_trials(study, store, study_name, search_dir)
    except BaseException:
        # a search that could not start (a bad or read-only storage) leaves no folder: its config.yaml
        # would name the bad storage, and the same command with a good one be refused as another search
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    log(f"search {study_name}: {done} of {scfg.trials} trials finished; objective {scfg.objective} "
         f"{metric} ({study.direction.name.lower()}); storage {_shown_url(url)}")

    if not scfg.space:
        log("search.space not given: the default space, " + "; ".join(f"{k} {_describe_param(p)}" for k, p in space.items()))
    objective = _objective(cfg, base_raw, search_dir, metric, space)
    failures_in_a_row: list[str] = []

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        n = len(study.get_trials(deepcopy=False, states=finished))
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0
        value = "" if trial.value is None else f" {metric} {trial.value:.4f}"
        if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
            value = f" at step {max(trial.intermediate_values)}{value} (its last evaluation)"
        value += f" ({trial.user_attrs['error']})" if "error" in trial.user_attrs else ""
        try:
            best = f"; best: trial {study.best_trial.number} ({study.best_value:.4f})"
        except ValueError:
            best = ""
        log(f"trial {trial.number} {trial.state.name.lower()}{value} in {seconds:.0f}s "
             f"({n}/{scfg.trials} finished{best})")
        if trial.state == optuna.trial.TrialState.FAIL:
            failures_in_a_row.append(trial.user_attrs.get("error", "failed"))
            if len(failures_in_a_row) >= MAX_FAILURES_IN_A_ROW:
                study.stop()  # every trial failing would otherwise loop for ever
        else:
            failures_in_a_row.clear()

    if done < scfg.trials:
        try:
            with _database_errors(url):
                study.optimize(objective, catch=(_TrialFailed,),
                               callbacks=[progress, optuna.study.MaxTrialsCallback(scfg.trials, states=finished)])
        except (Interrupted, KeyboardInterrupt) as exc:
            # Ctrl-C or SIGTERM, inside a trial's training (Interrupted) or between trials: the search,
            # not the trial, is what to continue
            signum = exc.signum if isinstance(exc, Interrupted) else \
                signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
            raise Interrupted(f"interrupted ({signal.Signals(signum).name}); finished trials are kept, the trial "
                              f"that was running runs again; continue with: tunesmith search --resume {search_dir}",
                              signum) from None
        except TunesmithError:
            # A setting the checks above could not see (e.g. an unknown train.metric): if this call
            # started the search and nothing finished, leave nothing behind.
            if created is not None:
                try:
                    if not study.get_trials(deepcopy=False, states=finished):
                        optuna.delete_study(study_name=study_name, storage=store)
                        shutil.rmtree(created, ignore_errors=True)
                except Exception:  # the database may be what failed: a read-only one cannot forget the study
                    shutil.rmtree(created, ignore_errors=True)
            raise
    result = _summarise(study, search_dir, base_raw, cfg, metric)
    publish(search_dir, cfg)
    if len(failures_in_a_row) >= MAX_FAILURES_IN_A_ROW:
        raise TunesmithError(f"search stopped: {len(failures_in_a_row)} trials in a row failed "
                             f"({failures_in_a_row[-1]}); see {search_dir / 'trials.csv'}")
    return result


def _objective(cfg: Config, base_raw: dict, search_dir: Path, metric: str, space: dict[str, SearchParam]):
    """One trial: sample, train (or cross-validate) in search_dir/trial-NNNN, return the metric."""
    import optuna

    scfg = cfg.search

    def objective(trial: optuna.Trial) -> float:
        # the trial number too: a re-queued trial starts with a copy of the dead trial's user attributes
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "trial": trial.number})
        params = _suggest(trial, base_raw, space)
        trial_cfg = _trial_config(base_raw, params, {"output.dir": str(search_dir),
                                                     "output.name": f"trial-{trial.number:04d}"})
        log(f"trial {trial.number}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
        pruned: list[int] = []

        def report(step: int, value: float) -> bool:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return False
            trial.report(value, step)
            if scfg.pruning and trial.should_prune():
                pruned.append(step)
                return True
            return False

        try:
            value = _run_trial(scfg, trial_cfg, search_dir / f"trial-{trial.number:04d}", metric, report)
        except (Interrupted, KeyboardInterrupt):
            # stopped by a signal, not by its parameters: queued again (Optuna records this one as failed;
            # trials.csv says 'interrupted') and its half-trained folder removed
            trial.set_user_attr("interrupted", True)
            trial.study.enqueue_trial(params, user_attrs={"requeued_from": trial.number})
            shutil.rmtree(search_dir / f"trial-{trial.number:04d}", ignore_errors=True)
            raise
        if pruned:
            raise optuna.TrialPruned(f"pruned at step {pruned[0]}")
        if value is None or math.isnan(value):
            trial.set_user_attr("error", f"validation {metric} is undefined")
            raise _TrialFailed(trial.user_attrs["error"])
        return float(value)

    return objective


def _run_trial(scfg, trial_cfg: Config, folder: Path, metric: str, report) -> float | None:
    """Train (or cross-validate) one trial in `folder`; its validation `metric` (None when undefined)."""
    if scfg.objective == "cv":
        from .cv import cross_validate
        return cross_validate(trial_cfg, cv_dir=folder, keep_models=False, on_fold=report).mean.get(metric)
    trial_splits = TASKS[trial_cfg.task].load_splits(trial_cfg)
    trial_splits.test = None  # the test split never takes part in choosing
    result = train(trial_cfg, splits=trial_splits, on_evaluate=lambda step, scores: report(step, scores.get(metric)))
    shutil.rmtree(result.run_dir / "checkpoints", ignore_errors=True)
    if not scfg.keep_models:
        shutil.rmtree(result.run_dir / "model", ignore_errors=True)
    return json.loads((result.run_dir / "metrics.json").read_text())["best_validation"][metric]


# ---------------------------------------------------------------- the space

def default_space(cfg: Config, train_examples: int) -> dict[str, SearchParam]:
    """The space searched when search.space is empty, like the Trainer's default Optuna space but
    centred on what this run would do: the learning rate from a fifth to 4x the strategy's automatic
    rate (log scale), passes over the data around the automatic plan's, batch size, warm-up and
    weight decay."""
    batch_size = resolve_batch_size(cfg, train_examples)
    lr, _ = resolve_lr(cfg, TASKS[cfg.task], batch_size)
    steps_per_epoch = math.ceil(train_examples / batch_size / cfg.train.grad_accum_steps)
    auto_epochs = max(1, math.ceil(auto_steps(steps_per_epoch, TASKS[cfg.task].auto_min_steps()) / steps_per_epoch))
    return {
        "train.lr": SearchParam(low=lr / 5, high=lr * 4, log=True),
        "train.epochs": SearchParam(type="int", low=max(1, auto_epochs // 2), high=max(2, 2 * auto_epochs)),
        "train.batch_size": SearchParam(choices=[16, 32, 64]),
        "train.warmup_ratio": SearchParam(low=0.0, high=0.2),
        "train.weight_decay": SearchParam(low=0.0, high=0.1),
    }


def _describe_param(p: SearchParam) -> str:
    if p.kind == "categorical":
        return "{" + ", ".join(map(str, p.choices)) + "}"
    return f"{_fmt(p.low if p.kind == 'float' else int(p.low))} to {_fmt(p.high if p.kind == 'float' else int(p.high))}" \
        + (" (log)" if p.log else "")


def _suggest(trial, base_raw: dict, space: dict[str, SearchParam]) -> dict[str, Any]:
    """Sample every parameter that applies: strategy settings that do not fit the sampled
    strategy.name (e.g. strategy.lora.r when it is 'full') are not sampled at all."""
    params: dict[str, Any] = {}
    for key in _ordered(space):
        spec = space[key]
        if key.startswith("strategy.") and key != "strategy.name" and "strategy.name" in params:
            if not _applies(base_raw, params, key, _example(spec)):
                continue
        if spec.kind == "categorical":
            params[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.kind == "int":
            params[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1),
                                            log=spec.log)
        else:
            params[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return params


def _ordered(space: dict) -> list[str]:
    # strategy.name first: which strategy settings apply depends on it
    return sorted(space, key=lambda k: k != "strategy.name")


def _example(spec: SearchParam) -> Any:
    return spec.choices[0] if spec.kind == "categorical" else int(spec.low) if spec.kind == "int" else spec.low


def _applies(base_raw: dict, params: dict, key: str, value: Any) -> bool:
    try:
        _trial_config(base_raw, {**params, key: value})
        return True
    except TunesmithError:
        try:
            _trial_config(base_raw, params)
        except TunesmithError:
            return True  # invalid either way: let the value's own error show
        return False


def _trial_config(base_raw: dict, params: dict[str, Any], extra: dict[str, Any] | None = None) -> Config:
    """The base config with a trial's parameters. A sampled strategy.name starts from a strategy
    section where only the base settings that fit the new strategy are kept."""
    raw = deep_copy(base_raw)
    raw.pop("search", None)  # a trial is a plain run
    if "strategy.name" in params:
        section = {"name": params["strategy.name"]}
        defaults = StrategyConfig().model_dump(mode="json")
        for key, value in raw.get("strategy", {}).items():
            if key == "name" or value == defaults.get(key):
                continue
            try:
                load_config(apply_overrides(raw, {"strategy": {**section, key: value}}))
                section[key] = value
            except TunesmithError:
                pass  # e.g. freeze_layers of a 'freeze' base config when the trial tries 'lora'
        raw["strategy"] = section
    return load_config(apply_overrides(raw, {**params, **(extra or {})}))


def _check_space(base_raw: dict, space: dict[str, SearchParam]) -> None:
    """Every value at the ends of every range must make a valid config (types, bounds, strategy fit)."""
    strategies = space["strategy.name"].choices if "strategy.name" in space else [None]
    for key, spec in space.items():
        values = spec.choices if spec.kind == "categorical" else [spec.low, spec.high]
        if spec.kind == "int":
            values = [int(v) for v in values]
        for value in values:
            errors = []
            for name in strategies:
                params = {"strategy.name": name} if name is not None and key != "strategy.name" else {}
                try:
                    _trial_config(base_raw, {**params, key: value})
                    break
                except TunesmithError as exc:
                    errors.append(str(exc).split(": ", 1)[-1])
            else:
                raise TunesmithError(f"search.space.{key}: {value!r} does not make a valid config ({errors[0]})")


# ---------------------------------------------------------------- storage and trials

def _with_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads postgresql:// as the psycopg (3) driver; where only psycopg2 is installed (the one
    this project depends on), the URL names it, so a plain postgresql:// URL works."""
    from importlib.util import find_spec

    if url.startswith("postgresql://") and find_spec("psycopg") is None and find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _storage(url: str):
    import optuna

    shown, url = _shown_url(url), _with_driver(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # the heartbeat is marked experimental in Optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                    heartbeat_stale_trial_callback=_retry())
        except Exception as exc:  # sqlalchemy raises many kinds for a bad URL or an unreachable database
            if attempt == STORAGE_ATTEMPTS - 1:
                raise TunesmithError(f"search.storage: cannot open {shown}: "
                                     f"{str(exc).splitlines()[0]}") from None
            # Workers starting together race to create the tables of a new database: one wins, the
            # others find them on the next attempt.
            time.sleep(0.5 + random.random() * attempt)
    raise AssertionError("unreachable")


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """The study database failing (read-only, locked, gone) is one line naming it, not SQLAlchemy's
    chained tracebacks. Optuna wraps the database's own error in a generic StorageInternalError."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) and exc.__cause__ else exc
        reason = str(getattr(cause, "orig", None) or cause).splitlines()[0]
        raise TunesmithError(f"search.storage {_shown_url(url)}: the study database failed ({reason})") from None


def _retry():
    """Queue a cut-off trial's parameters once more (not forever: a trial that kills its worker
    every time would otherwise come back endlessly)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)


def _trials_of(store, study_name: str) -> list:
    try:
        return store.get_all_trials(store.get_study_id_from_name(study_name), deepcopy=False)
    except KeyError:
        return []


def _requeue_dead_trials(study, store, study_name: str, search_dir: Path) -> None:
    """Trials left RUNNING by a killed worker of this machine: failed now, their parameters queued
    again, their half-trained folders removed (the heartbeat requeues those of other machines after the
    grace period). A worker attribute written for another trial number is a copy: Optuna's retry gives the
    re-queued trial the dead trial's user attributes, and a live worker that has just taken it has not yet
    written its own; failing it would pull the trial from under that worker."""
    import optuna

    here, study_id = socket.gethostname(), store.get_study_id_from_name(study_name)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}
        if worker.get("host") != here or worker.get("trial") != t.number or _alive(worker.get("pid")):
            continue
        trial_id = store.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            failed = store.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker starting at the same time did it
            continue
        if failed:
            _retry()(study, store.get_trial(trial_id))
            shutil.rmtree(search_dir / f"trial-{t.number:04d}", ignore_errors=True)
            log(f"trial {t.number} was cut off (worker {worker.get('pid')} is gone): marked failed, "
                 "its parameters queued again")


def _alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shown_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- the summary

def _summarise(study, search_dir: Path, base_raw: dict, cfg: Config, metric: str) -> SearchResult:
    import optuna
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        state = "interrupted" if t.user_attrs.get("interrupted") else t.state.name.lower()  # Optuna says FAIL
        rows.append({"number": t.number, "state": state, "value": t.value,
                     "seconds": None if seconds is None else round(seconds, 1),
                     "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                     "params": dict(t.params)})
    frame = pd.DataFrame([{**{k: v for k, v in r.items() if k != "params"},
                           **{f"param {k}": v for k, v in r["params"].items()}} for r in rows])
    write_frame_atomic(frame, search_dir / "trials.csv")

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best_value, best_params, best_path, importance, importance_note = None, {}, None, None, None
    if completed:
        best = study.best_trial
        best_value, best_params = best.value, dict(best.params)
        best_cfg = _trial_config(base_raw, best_params, {
            "output.dir": cfg.output.dir, "output.name": f"{search_dir.name}-best"})
        best_path = search_dir / "best_config.yaml"
        header = (f"# Best of {len(completed)} completed trials of search {search_dir.name}: trial {best.number}, "
                  f"validation {metric} {best.value:.4f} ({cfg.search.objective}).\n"
                  f"# Launch:  tunesmith train {best_path}\n")
        body = yaml.safe_dump(best_cfg.model_dump(mode="json", exclude={"search"}), sort_keys=False)
        write_text_atomic(best_path, header + body)
    if len(completed) >= 2:
        try:
            with warnings.catch_warnings():  # few trials: Optuna warns the estimate is rough (it is; said in docs)
                warnings.simplefilter("ignore")
                importance = {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
        except (RuntimeError, ValueError) as exc:  # e.g. every completed trial has the same value
            importance_note = str(exc).splitlines()[0]
    else:
        importance_note = f"needs at least 2 completed trials ({len(completed)} so far)"
    summary = {"study": search_dir.name, "metric": metric, "objective": cfg.search.objective,
               "direction": study.direction.name.lower(), "trials": rows,
               "best": {"value": best_value, "params": best_params,
                        "config": str(best_path) if best_path else None},
               "importance": importance, "importance_note": importance_note}
    write_text_atomic(search_dir / "search.json", json.dumps(summary, indent=1, default=str))
    return SearchResult(search_dir, search_dir.name, best_value, best_params, best_path, rows, importance)


def format_search_table(result: SearchResult) -> str:
    """Trials table (one row per trial), the best parameters and config, parameter importance."""
    keys = sorted({k for r in result.trials for k in r["params"]})
    cells = [["trial", "state", "value", "seconds", *keys]]
    for r in result.trials:
        cells.append([str(r["number"]), r["state"], "" if r["value"] is None else f"{r['value']:.4f}",
                      "" if r["seconds"] is None else f"{r['seconds']:.0f}",
                      *(_fmt(r["params"][k]) if k in r["params"] else "-" for k in keys)])
    widths = [max(len(row[j]) for row in cells) for j in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) if j != 1 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.append("")
    if result.best_config is not None:
        lines.append(f"best value {result.best_value:.4f}: "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in result.best_params.items()))
        lines.append(f"best config: {result.best_config}  (tunesmith train {result.best_config})")
    else:
        lines.append("no trial completed yet")
    if result.importance:
        lines.append("parameter importance: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in result.importance.items()))
    else:
        lines.append("parameter importance: not available (needs at least 2 completed trials with different values)")
    return "\n".join(lines)
