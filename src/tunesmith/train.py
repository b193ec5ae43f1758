"""train(config) = setup -> fit -> finish.

setup: read + check the data, build the backbone + head, apply the strategy, plan the steps; nothing
is written before every input check has passed. fit (loop.py): the training loop. finish: the best
model on the validation and test splits, metrics.json, warnings when the model learned nothing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate.utils import set_seed

from . import distill, distributed, fsdp, inputs
from .atomic import recover_dir, remove_stale_temps, replace_dir, write_text_atomic
from .checkpoint import latest_checkpoint, load_weights
from .config import Config, config_to_yaml, load_config, locate
from .errors import TunesmithError
from .evaluate import scalar_metrics
from .imbalance import Balance, describe
from .imbalance import setup as setup_imbalance
from .inference import choose_precision, example_outputs, load_model_dir, save_model_dir, write_frame_atomic
from .lock import FolderLock
from .loop import FitOutcome, fit
from .models import count_parameters, resolve_model, set_dropout
from .runlog import append_jsonl, count, log, warn
from .schedule import TrainingPlan, auto_steps, make_plan
from .strategies import Plan, apply_strategy, is_peft
from .tasks import TASKS
from .timing import format_seconds, process_seconds, started_by_worker

MIN_VALIDATION_EXAMPLES = 30  # fewer cannot tell checkpoints apart reliably (one example is 3+ points)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict              # test metrics (validation metrics when there is no test split)
    validation_metrics: dict | None
    train_samples_per_second: float
    test_logits: Any = None    # the best model's outputs on the test split (cross-validation pools them)


@dataclass
class Setup:
    """Everything fit() and finish() need, checked and built."""
    cfg: Config
    task: Any
    run_dir: Path
    resuming: bool
    splits: Any
    labels: Any
    model: torch.nn.Module
    processor: Any             # what turns examples into model inputs: a tokenizer, image settings
    train_enc: Any
    val_enc: Any
    balance: Balance
    metric: str
    precision: str
    strategy: Plan
    plan: TrainingPlan
    started: float             # time.perf_counter() when train() began (the time budget counts from here)
    encode_seconds: float      # preparing the train and validation inputs (tokenizing, decoding images)
    teacher: Any = None        # distill.Teacher: soft targets for every training input (distill.teacher)
    seconds: dict[str, float] = field(default_factory=dict)  # the fixed costs (timing.py), in metrics.json


def new_run_dir(cfg: Config) -> Path:
    base = cfg.output.name or f"{cfg.data.dataset or inputs.stem(cfg.data.train)}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Path(cfg.output.dir)
    run_dir, n = root / base, 1
    while run_dir.exists():
        n += 1
        run_dir = root / f"{base}-{n}"
    return run_dir


def _create_run_dir(cfg: Config) -> Path:
    """new_run_dir, created: of two runs starting at once with one output.name, the second gets name-2."""
    while True:
        run_dir = new_run_dir(cfg)
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:  # another run created it since new_run_dir looked
            continue
        except OSError as exc:  # a read-only or missing output.dir, a full disk
            raise TunesmithError(f"{run_dir}: cannot create the run folder ({exc.strerror}); "
                                 "check output.dir") from None


def train(config: str | Path | dict | Config | None, overrides: dict[str, Any] | None = None,
          resume: str | Path | None = None, *, splits=None,
          on_evaluate: Callable[[int, dict], bool] | None = None) -> TrainResult:
    """Fine-tune as the config says; returns the run folder and its metrics.

    `splits` (the task's Splits) replaces reading the data: cross-validation passes each fold.
    `on_evaluate(step, validation_scores)` sees every evaluation; returning True stops training
    (hyperparameter search prunes a bad trial this way).
    """
    distributed.check_supported()
    with inputs.in_memory_data(config, overrides) as (config, overrides), ExitStack() as locks:
        state = _run_state(Path(resume)) if resume is not None else None
        if state == "finished":  # killed after its last write: nothing left to do
            return _finished_result(Path(resume))
        if state == "refit pending":  # killed while training again on all rows
            locks.enter_context(FolderLock.acquire(Path(resume), "is training in it"))
            result = refit(Path(resume))
            publish(Path(resume), load_config(Path(resume) / "config.yaml", saved=True))
            return result
        run = setup(config, overrides, resume, splits, locks)
        outcome = fit(run, on_evaluate)
        # cross-validation folds (splits) and search trials (on_evaluate) are scored on their validation rows
        standalone = splits is None and on_evaluate is None
        result = finish(run, outcome, refit_allowed=standalone)
        if _run_state(run.run_dir) == "refit pending":
            result = refit(run.run_dir)
        if standalone:  # a fold or a trial is shown in the report of its cv or search
            publish(run.run_dir, run.cfg)
        return result


# ---------------------------------------------------------------- setup

def _load(config, overrides, resume) -> tuple[Config, Path]:
    if resume is None:
        cfg = load_config(config, overrides)
        return cfg, new_run_dir(cfg)
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise TunesmithError(f"{run_dir}: not a tunesmith run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", saved=True)
    if config is not None and load_config(config, overrides).model_dump() != cfg.model_dump():
        log(f"resuming with the configuration saved in {run_dir}/config.yaml (the given one differs)")
    return cfg, run_dir


def setup(config, overrides=None, resume=None, splits=None, locks: ExitStack | None = None) -> Setup:
    """Check and build everything; the run folder is locked (.lock, one writer) until `locks` closes.
    Several processes: each one checks and builds the same; the main one creates, locks and writes the folder."""
    started = time.perf_counter()
    seconds = {"before_train": process_seconds()}  # a CLI run: Python start-up and imports
    cfg, run_dir = _load(config, overrides, resume)
    main, processes = distributed.is_main(), distributed.processes()
    if resume is not None and locks is not None and main:  # before anything is read: a second --resume stops here
        locks.enter_context(FolderLock.acquire(run_dir, "is training in it"))
    tcfg, task = cfg.train, TASKS[cfg.task]
    if fsdp.requested():
        fsdp.check_strategy(cfg.strategy.name)
    set_seed(tcfg.seed)  # accelerate's: the same seeds; transformers.set_seed imports peft (2.47 CPU s) with it
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    # ---- data and model (all input checks happen here, before anything is written)
    read_started = time.perf_counter()
    splits = task.load_splits(cfg) if splits is None else splits
    labels = splits.labels
    seconds["read_data"] = time.perf_counter() - read_started
    model, processor = task.build_model(resolve_model(cfg.model.name), labels, cfg)
    if cfg.distill.student_layers:
        kept = distill.keep_blocks(model, cfg.distill.student_layers, cfg.model.name)
        log(f"distill.student_layers: kept blocks {', '.join(map(str, kept))} of {cfg.model.name}")
    teacher = None
    if cfg.distill.teacher is not None:  # checked (task, labels) before anything is computed or written
        teacher = distill.load_teacher(cfg, task, labels)
    encode_started = time.perf_counter()  # tokenizing, or decoding the images once
    seconds["load_model"] = encode_started - read_started - seconds["read_data"]
    train_enc = task.encode(processor, splits.train, cfg, train=True)
    val_enc = task.encode(processor, splits.validation, cfg) if splits.validation else None
    encode_seconds = seconds["encode"] = time.perf_counter() - encode_started
    if teacher is not None:  # data.unlabeled joins the training inputs; the teacher's outputs for all of them
        train_enc = distill.prepare(teacher, task, processor, splits, train_enc, cfg, labels)
    try:
        balance = setup_imbalance(task, cfg, splits, labels)
    except TunesmithError as exc:  # a hand weight naming no class: point at the key in the config file (or override)
        config_file = run_dir / "config.yaml" if resume is not None else \
            config if isinstance(config, (str, Path)) else None
        given = overrides if resume is None else None  # a resumed run's config holds every value
        raise TunesmithError(f"{locate(config_file, 'imbalance.weights', given)}: {exc}") from None
    metric = _check_metric(cfg, task, splits, labels)
    n_val = len(splits.validation) if splits.validation is not None else 0
    plan = make_plan(cfg, task, len(train_enc.features), n_val, processes)
    precision = choose_precision(tcfg.precision, parameters=sum(p.numel() for p in model.parameters()),
                                 cpu_needs_amx=task.cpu_bf16_needs_amx())
    if plan.dropout is not None:  # before the strategy: LoRA's own dropout is strategy.lora.dropout
        set_dropout(model, plan.dropout)
    model, strategy = apply_strategy(model, cfg, plan.steps_per_epoch, plan.lr)

    if resume is None:
        if main:
            run_dir = _create_run_dir(cfg)
            if locks is not None:
                locks.enter_context(FolderLock.acquire(run_dir, "is training in it"))
        # the main process's folder (its name has the time in it, and -2 when taken): one folder for all
        run_dir = distributed.broadcast(run_dir)
        cfg = inputs.persist(cfg, run_dir, write=main)  # in-memory data: a copy in the run folder, for --resume
        if main:
            write_text_atomic(run_dir / "config.yaml", config_to_yaml(cfg))  # never a half-written config
    run = Setup(cfg, task, run_dir, resume is not None, splits, labels, model, processor,
                train_enc, val_enc, balance, metric, precision, strategy, plan, started, encode_seconds, teacher,
                seconds)
    _log_setup(run)
    seconds["setup"] = time.perf_counter() - started  # all of setup(): the three above and the rest
    return run


def _check_metric(cfg: Config, task, splits, labels) -> str:
    metric = task.default_metric(labels) if cfg.train.metric == "auto" else cfg.train.metric
    if splits.validation is not None:
        available = task.metric_names(labels)
        if metric not in available and metric != "loss":
            raise TunesmithError(f"train.metric: unknown metric '{metric}' (available: loss, {', '.join(available)})")
    elif isinstance(cfg.train.early_stopping_patience, int):
        raise TunesmithError("train.early_stopping_patience needs a validation split "
                             "(data.validation or data.validation_fraction > 0)")
    return metric


def _log_setup(run: Setup) -> None:
    cfg, splits, plan = run.cfg, run.splits, run.plan
    log(f"run folder {run.run_dir}")
    distribution = run.balance.summary["distribution"]  # class counts per split, counted once by setup_imbalance
    counts = lambda split: f" ({describe(distribution[split])})" if distribution.get(split) else ""  # noqa: E731
    for name, ex, enc in (("train", splits.train, run.train_enc), ("validation", splits.validation, run.val_enc)):
        if ex is not None:
            log(f"{name}: {len(ex)} examples{counts(name)}; {run.task.describe_inputs(enc, cfg)}")
    if splits.test is not None:
        log(f"test: {len(splits.test)} examples{counts('test')}")
    if run.teacher is not None:
        log(distill.describe(run.teacher, cfg, len(run.train_enc.features)))
    if run.balance.summary.get("weights") or cfg.imbalance.method != "none":
        shown = describe(run.balance.summary.get("weights", {}))
        log(f"imbalance {cfg.imbalance.method}" + (f"; class weights: {shown}" if shown else "")
            + (f"; gamma {cfg.imbalance.gamma}" if cfg.imbalance.method == "focal" else ""))
    if cfg.augment:
        log("augmentation of training examples, new every epoch: " + ", ".join(f"{op.op} (p {op.p})" for op in cfg.augment))
    evals = "at the end of every epoch" if plan.eval_every is None else f"every {plan.eval_every} steps"
    dropout = "the model's own" if plan.dropout is None else f"{plan.dropout:g}"
    per_process = (f" ({plan.batch_size // plan.processes} per process x {plan.processes} processes)"
                   if plan.processes > 1 else "")
    log(f"plan: {plan.total_steps} optimizer steps ({plan.reason}); batch {plan.batch_size}{per_process}"
        f"{' (auto)' if cfg.train.batch_size == 'auto' else ''}"
        f"{f' x {cfg.train.grad_accum_steps} accumulation' if cfg.train.grad_accum_steps > 1 else ''}; "
        f"learning rate {plan.lr:.3g} ({plan.lr_reason}); dropout {dropout} ({plan.dropout_reason}); "
        f"validation {evals}, best model by {run.metric}")
    _warn_about_the_plan(run)


def _warn_about_the_plan(run: Setup) -> None:
    """Say it up front when the run is unlikely to learn."""
    cfg, splits, plan = run.cfg, run.splits, run.plan
    if cfg.train.epochs != "auto" and not cfg.train.max_steps:
        needed = auto_steps(plan.steps_per_epoch, run.task.auto_min_steps())
        if plan.total_steps < needed / 2:
            warn(f"train.epochs {cfg.train.epochs:g} gives {plan.total_steps} optimizer steps for "
                 f"{len(run.train_enc.features)} training inputs; small data usually needs about "
                 f"{needed} to learn more than the majority class (train.epochs: auto plans them)")
    if splits.validation is None:
        return
    n_val = len(splits.validation)
    if n_val < MIN_VALIDATION_EXAMPLES:
        warn(f"the validation split has only {n_val} examples: too few to choose the best checkpoint reliably "
             f"(give data.validation, or more data; {MIN_VALIDATION_EXAMPLES}+ recommended)")
    distribution = run.balance.summary["distribution"]
    missing = [c for c, n in distribution.get("train", {}).items()
               if n > 0 and distribution.get("validation", {}).get(c, 0) == 0]
    if missing and run.task.has_classes(run.labels):
        warn(f"no validation example of {', '.join(repr(m) for m in missing[:5])}"
             f"{' ...' if len(missing) > 5 else ''}: the metric that picks the best model cannot see "
             "these classes")


# ---------------------------------------------------------------- finish

def finish(run: Setup, outcome: FitOutcome, refit_allowed: bool = False) -> TrainResult:
    cfg, task, splits, labels, run_dir = run.cfg, run.task, run.splits, run.labels, run.run_dir
    state, model = outcome.state, outcome.model
    device = next(model.parameters()).device
    collate = outcome.collate
    main = distributed.is_main()  # several processes: all evaluate their share, the main one writes
    distributed.barrier()  # the best model/ is written (by the main process) before any process reads it back
    sharded = fsdp.is_sharded(model)
    if run.val_enc is None or state.best_step is None:  # no best model chosen (metric always NaN): keep the last
        weights = fsdp.full_state(model)[0] if sharded else None  # FSDP: gathered, every process takes part
        if main:
            save_model_dir(run_dir / "model", model, run.processor, cfg, labels, task, weights)
        state.best_step = state.step
    elif is_peft(model):  # model/ holds the merged model (or the adapter): load it the way predict does
        model = load_model_dir(run_dir / "model", task, labels, cfg)[0].to(device)
    elif sharded:  # the main process reads model/, each process keeps its shards
        fsdp.load_weights_file(model, run_dir / "model" / "model.safetensors")
    else:
        load_weights(model, run_dir / "model" / "model.safetensors")
    model.eval()
    total = count_parameters(model)[1]  # of the final model (a LoRA run's merged one); what learned: the outcome's
    summary: dict[str, Any] = {
        "best_step": state.best_step, "best_validation": {run.metric: state.best_metric},
        "plan": {"total_steps": run.plan.total_steps, "steps_per_epoch": run.plan.steps_per_epoch,
                 "batch_size": run.plan.batch_size,
                 "reason": run.plan.reason, "lr": run.plan.lr, "lr_reason": run.plan.lr_reason,
                 "dropout": run.plan.dropout, "dropout_reason": run.plan.dropout_reason,
                 "best_from_step": run.plan.best_from_step,
                 "eval_every": run.plan.eval_every, "stopped": outcome.stopped, "processes": run.plan.processes},
        "train": {"steps": state.step, "seconds": round(outcome.train_seconds, 2),
                  "samples_per_second": round(outcome.samples_per_second, 2), "precision": run.precision,
                  "trainable_parameters": outcome.trainable_parameters, "total_parameters": total},
        "hardware": hardware(device),
        "imbalance": run.balance.summary,
        "augment": [op.model_dump() for op in cfg.augment],
        "data": {"train": len(splits.train),
                 "validation": len(splits.validation) if splits.validation else 0,
                 "test": len(splits.test) if splits.test else 0,
                 "max_length": cfg.model.max_length, "long_text": cfg.model.long_text,
                 "long_train": run.train_enc.truncated, "train_windows": len(run.train_enc.features),
                 "long_validation": run.val_enc.truncated if run.val_enc else 0,
                 "encode_seconds": round(run.encode_seconds, 2)},
        "strategy": {"name": cfg.strategy.name, "param_groups": outcome.param_groups,
                     "trainable_parameters": outcome.trainable_parameters, "total_parameters": total,
                     "epoch_seconds": outcome.epoch_seconds,
                     "seconds_per_epoch": round(outcome.train_seconds * run.plan.steps_per_epoch / max(1, state.step), 3),
                     "feature_cache": outcome.cache_summary},
    }
    if run.teacher is not None:
        summary["distill"] = distill.summary(run.teacher, cfg)
    elif cfg.distill.student_layers:
        summary["distill"] = {"student_layers": cfg.distill.student_layers}
    result_metrics: dict = {}
    validation_metrics, test_logits = None, None
    if run.val_enc is not None:
        validation_metrics = state.extra.get("best_validation_metrics")
        if validation_metrics is None or state.best_step != state.extra.get("best_validation_step"):
            logits, _ = example_outputs(model, task, run.val_enc, collate, cfg.train.eval_batch_size, device,
                                        run.precision, cfg.model.chunk_aggregation, spread=True)
            validation_metrics = task.compute_metrics(logits, splits.validation.targets, labels)
        summary["validation"] = validation_metrics
        result_metrics = validation_metrics
        degenerate = _warn_if_degenerate(task, validation_metrics, labels)
        if refit_allowed and _wants_refit(run, degenerate):
            summary["refit"] = {"status": "pending", "steps": max(run.plan.planned_steps, state.step),
                                "batch_size": run.plan.batch_size, "lr": run.plan.lr,
                                "rows": len(splits.train) + len(splits.validation)}
    if splits.test is not None:
        test_started = time.perf_counter()
        test_enc = task.encode(run.processor, splits.test, cfg)
        if test_enc.truncated:
            log(f"test: {task.describe_inputs(test_enc, cfg)}")
        started_eval = time.perf_counter()
        test_logits, _ = example_outputs(model, task, test_enc, collate, cfg.train.eval_batch_size, device,
                                         run.precision, cfg.model.chunk_aggregation, spread=True)
        eval_seconds = time.perf_counter() - started_eval
        result_metrics = task.compute_metrics(test_logits, splits.test.targets, labels)
        summary["test"] = result_metrics
        summary["test_samples_per_second"] = round(len(test_enc.features) / max(eval_seconds, 1e-9), 2)
        if run.teacher is not None:  # the teacher's own score on the same test split, next to the student's
            summary["distill"]["teacher_test"] = _teacher_test(run)
            summary["distill"]["student_test"] = scalar_metrics(result_metrics)
        if main:
            write_frame_atomic(task.predictions_frame(splits.test, test_logits, labels),
                               run_dir / "test_predictions.csv")
            append_jsonl(run_dir / "metrics.jsonl", {"type": "test", "step": state.step,
                                                     "test": scalar_metrics(result_metrics)})
        run.seconds["test"] = time.perf_counter() - test_started  # encode, outputs, metrics, predictions file
    run.seconds["process_at_finish"] = process_seconds()
    summary["timing"] = {k: round(v, 2) for k, v in run.seconds.items()}
    summary["warm_worker"] = started_by_worker()  # the command ran in `tunesmith worker`'s child (worker.py)
    if main:
        write_text_atomic(run_dir / "metrics.json", json.dumps(summary, indent=1))  # it marks the run finished
        if not cfg.train.keep_checkpoints:  # the run is complete: model/ and the logs are what it keeps
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    distributed.barrier()  # the run is finished (metrics.json) when any process returns
    if result_metrics:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scalar_metrics(result_metrics).items())
        log(f"{'test' if splits.test is not None else 'validation'}: {shown}")
    log(f"time outside training: {_fixed_costs(run.seconds)}")
    log(f"trained {state.step} steps in {outcome.train_seconds:.1f}s ({outcome.samples_per_second:.1f} samples/s); "
        f"strategy {cfg.strategy.name}: {count(outcome.trainable_parameters)} of {count(total)} parameters "
        f"trainable, {summary['strategy']['seconds_per_epoch']:.1f}s per epoch; model in {run_dir / 'model'}")
    return TrainResult(run_dir, result_metrics, validation_metrics, outcome.samples_per_second, test_logits)


def hardware(device: torch.device) -> dict:
    """What the run trained on, for the report (speeds mean little without it)."""
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() is often empty
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"device": str(device), "cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def publish(folder: Path, cfg: Config) -> None:
    """The end of a finished run, cv or search: report.html (config `report`) and the trackers
    (`tracking`). Neither can fail what has finished: their errors are warnings. The main process only."""
    if not distributed.is_main():
        return
    report_path = None
    if cfg.report:
        from .report import report_after
        report_path = report_after(folder)
    if cfg.tracking:
        from .tracking import track_after
        track_after(folder, cfg, report_path)


def _teacher_test(run: Setup) -> dict:
    started = time.perf_counter()
    outputs, enc = distill.teacher_outputs(run.teacher, run.splits.test)
    seconds = time.perf_counter() - started
    scores = scalar_metrics(run.task.compute_metrics(outputs, run.splits.test.targets, run.labels))
    log("distill: teacher on the test split: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        + f" ({len(enc.features)} inputs in {seconds:.1f}s)")
    return scores


def _fixed_costs(seconds: dict[str, float]) -> str:
    """What the user waited for besides training and evaluations, as one log line."""
    setup = {k: seconds[k] for k in ("before_train", "read_data", "load_model", "encode") if k in seconds}
    line = f"setup {format_seconds(setup)}"
    if "first_step" in seconds:
        origin = "the command started, in the warm worker" if started_by_worker() else "the process started"
        line = f"first training step {seconds['before_train'] + seconds['first_step']:.1f}s after {origin} ({line})"
    rest = {k: seconds[k] for k in ("checkpoints", "test") if k in seconds}
    return line + (f"; {format_seconds(rest)}" if rest else "")


def _warn_if_degenerate(task, metrics: dict, labels) -> bool:
    """The best model predicts one class (or no entity) for every validation example: it learned nothing."""
    problem = task.degenerate_predictions(metrics, labels)
    if problem:
        warn(f"the best model {problem} on the validation split: it learned nothing beyond the most frequent "
             "answer. Try more optimizer steps (train.epochs: auto, or more epochs), another train.lr, "
             "or imbalance.method: class_weights when one class dominates")
    return bool(problem)


# ---------------------------------------------------------------- refit

REFIT_DIR = "refit"


def _wants_refit(run: Setup, degenerate: bool) -> bool:
    """train.refit: train again on train + validation? Only where the validation rows were held out of
    the training file (data.validation_fraction) and the plan was seen to learn on them."""
    cfg = run.cfg
    if not cfg.train.refit:
        return False
    skipped = ("the validation rows come from data.validation (a file of their own)"
               if isinstance(cfg.data.validation, str) else
               "no validation rows are held out" if not cfg.data.holds_out else
               "the plan did not learn on the validation split (see the warning above)" if degenerate else
               "train.time_limit is set (the budget is the first run's)" if cfg.train.time_limit else
               "several processes train (not supported there yet)" if run.plan.processes > 1 else None)
    if skipped:
        log(f"train.refit: skipped, {skipped}")
    return skipped is None


def _run_state(run_dir: Path) -> str | None:
    """'finished' once metrics.json is written (atomically: the run has its model and test predictions),
    'refit pending' while a refit has still to run or finish, None before."""
    try:
        summary = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    return "refit pending" if summary.get("refit", {}).get("status") == "pending" else "finished"


def _finished_result(run_dir: Path) -> TrainResult:
    """--resume of a finished run (a kill after its last write): say so, finish the clean-up, change nothing."""
    if distributed.is_main():  # several processes: one cleans up
        with FolderLock.acquire(run_dir, "is training in it"):
            cfg = load_config(run_dir / "config.yaml", saved=True)
            if not cfg.train.keep_checkpoints:  # a kill may have come while they were being removed
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            remove_stale_temps(run_dir)
    summary = json.loads((run_dir / "metrics.json").read_text())
    log(f"{run_dir}: the run has finished already (metrics.json); nothing to resume")
    return TrainResult(run_dir, summary.get("test") or summary.get("validation") or {}, summary.get("validation"),
                       summary.get("train", {}).get("samples_per_second", 0.0))


def refit(run_dir: Path) -> TrainResult:
    """Train again from the pretrained model on all the training file's rows (validation included) for
    the steps the first run planned, at its batch size and learning rate, in RUN/refit; then its model and
    test predictions replace the first run's. Measured (docs/defaults.md, 3 seeds each): macro F1 on 200
    Rotten Tomatoes reviews 0.705 -> 0.723, on 1,000 0.776 -> 0.781, but on 300 debate statements
    0.603 -> 0.580: off by default. A killed refit continues with --resume RUN."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    spec, refit_dir = summary["refit"], run_dir / REFIT_DIR
    result = None
    if not (refit_dir / "metrics.json").is_file():  # not finished yet
        if (refit_dir / "config.yaml").is_file() and latest_checkpoint(refit_dir) is not None:
            log(f"refit: continuing in {refit_dir}")
            result = train(None, resume=refit_dir)
        else:
            shutil.rmtree(refit_dir, ignore_errors=True)  # killed before its first checkpoint: start again
            log(f"refit: the plan learned on the validation split (best {summary['best_validation']}); training "
                f"again on all {spec['rows']} rows (train + validation) for {spec['steps']} steps, keeping the "
                "last model (train.refit)")
            cfg = load_config(run_dir / "config.yaml", {
                "data.validation_fraction": 0.0, "train.refit": False, "train.max_steps": spec["steps"],
                "train.batch_size": spec["batch_size"], "train.lr": spec["lr"], "train.keep_checkpoints": False,
                "output.dir": str(run_dir), "output.name": REFIT_DIR,
                "report": False, "tracking": [], "tracking_uri": None}, saved=True)  # the run reports, not refit/
            result = train(cfg)
    refit_summary = json.loads((refit_dir / "metrics.json").read_text())
    # the refit model and its test predictions replace the first run's (each move is a rename)
    if (refit_dir / "model").is_dir():
        replace_dir(refit_dir / "model", run_dir / "model")
    recover_dir(run_dir / "model")
    if (refit_dir / "test_predictions.csv").is_file():
        os.replace(refit_dir / "test_predictions.csv", run_dir / "test_predictions.csv")
    summary["refit"] = {**spec, "status": "done", "seconds": refit_summary["train"]["seconds"],
                        "test_before_refit": summary.get("test")}
    if "test" in refit_summary:
        summary["test"] = refit_summary["test"]
        append_jsonl(run_dir / "metrics.jsonl", {"type": "test", "step": refit_summary["train"]["steps"],
                                                 "refit": True, "test": scalar_metrics(refit_summary["test"])})
    write_text_atomic(run_dir / "metrics.json", json.dumps(summary, indent=1))
    if "test" in refit_summary:
        before = scalar_metrics(summary["refit"]["test_before_refit"] or {})
        shown = ", ".join(f"{k} {v:.4f}" + (f" (before the refit {before[k]:.4f})" if k in before else "")
                          for k, v in scalar_metrics(refit_summary["test"]).items())
        log(f"test after the refit on all rows: {shown}")
    log(f"model in {run_dir / 'model'} (trained on train + validation; the validation scores above are the "
        "first run's best checkpoint)")
    return TrainResult(run_dir, summary.get("test") or summary.get("validation") or {}, summary.get("validation"),
                       summary["train"]["samples_per_second"], result.test_logits if result is not None else None)
