"""fit(): THE training loop, read top to bottom; the one place that knows accelerate.

for each epoch: length-grouped batches -> forward/backward (bf16 autocast where fast) -> clip, step ->
evaluate at the planned steps / keep the best model / stop early or at the time budget -> checkpoint.

Several processes (DDP, distributed.py): every process forms the same global batches and trains on its
share of each; DDP averages the gradients (not while accumulating: no_sync); validation outputs are
gathered; every decision to stop is taken together; only the main process writes. Under FSDP (fsdp.py)
the same, with the model sharded by tunesmith instead of wrapped by accelerate, and whole state dicts
gathered for every write.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import distributed, fsdp
from .atomic import remove_stale_temps
from .checkpoint import (TrainState, latest_checkpoint, load_checkpoint, read_state, resumable_checkpoint,
                         rng_state, save_checkpoint)
from .distill import distill_loss, epoch_inputs
from .dropout import use_fast_dropout
from .errors import Interrupted, TunesmithError
from .evaluate import is_improvement, scalar_metrics
from .features import build_feature_cache
from .inference import example_outputs, pad_multiple, predict_outputs, save_model_dir
from .models import count_parameters
from .runlog import append_jsonl, count, log, truncate_jsonl
from .schedule import Budget, describe_seconds, lr_factor
from .strategies import describe_groups, optimizer_groups, set_train_mode, unfreeze, unfreeze_due

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel we measured; others use foreach
BUDGET_EVERY_STEPS = 10     # a time budget re-plans the run this often (and after every evaluation) ...
BUDGET_PACE_STEPS = 50      # ... at the pace of the latest steps, not of the slower first ones
FINISH_SECONDS = 0.5        # loading the best model back and writing the summary (time budget)
TRAIN_LOG_POINTS = 100      # about this many {"type": "train"} lines (loss, lr) per run: the report's curves


@dataclass
class FitOutcome:
    state: TrainState
    model: torch.nn.Module          # unwrapped, on its device
    collate: Callable[[list[dict]], dict]
    param_groups: list[dict]
    trainable_parameters: int       # at the end (gradual unfreezing changes it)
    train_seconds: float
    samples_per_second: float
    epoch_seconds: list[float]
    cache_summary: dict | None
    stopped: str                    # why training ended: "plan", "early stopping", "time limit", "callback"


def make_batches(lengths: list[int], batch_size: int, seed: int, group_by_length: bool,
                 sample_weights: np.ndarray | None = None) -> list[list[int]]:
    """Shuffled batches of indices; with grouping, each batch holds texts of similar length.

    Grouping sorts within shuffled windows of 50 batches, so batches stay random in order and
    content but pad far less: padding is set by the longest text in each batch.
    With sample_weights (oversampling), the epoch is len(lengths) draws with replacement, example i
    drawn with probability w_i / sum(w); the seed fixes the draws, so a resumed epoch is the same.
    """
    rng = np.random.default_rng(seed)
    if sample_weights is None:
        order = rng.permutation(len(lengths))
    else:
        order = rng.choice(len(lengths), size=len(lengths), replace=True, p=sample_weights / sample_weights.sum())
    if group_by_length:
        lengths_arr = np.asarray(lengths)
        window = batch_size * 50
        order = np.concatenate([chunk[np.argsort(-lengths_arr[chunk], kind="stable")]
                                for chunk in np.array_split(order, max(1, math.ceil(len(order) / window)))])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def make_accelerator(precision: str) -> Accelerator:
    """An Accelerator running this run's precision, whatever ran before in this process.

    accelerate keeps one process-wide AcceleratorState whose mixed precision is fixed by the first
    Accelerator and refuses a different one later (a notebook training fp32 then bf16, a search over
    train.precision, cv after a run). Its mixed-precision part is cleared when the precision changes;
    the PartialState under it (device, process group of a distributed launch) is kept as it is.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    wanted = "bf16" if precision == "bf16" else "no"
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != wanted:
        AcceleratorState._reset_state(reset_partial_state=False)
    # cpu: without CUDA, the processes of a launch form a gloo group only when accelerate is told so.
    # find_unused_parameters off (no extra pass over the graph every step): the heads and strategies here use
    # every trainable weight in each forward pass (token classification models have no pooler)
    return Accelerator(mixed_precision=wanted, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])


class _StopSignals:
    """SIGINT and SIGTERM while training: the first lets the current step finish, then the loop saves a
    checkpoint and stops (resuming continues exactly there); a second one stops at once, dropping the
    step (the previous checkpoint stays). Handlers can only be set from the main thread: elsewhere the
    signals keep their usual effect. A signal the process was started ignoring (SIGINT for a script's
    `command &`) stays ignored here too, as Python leaves it everywhere else in the run."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        log(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(send it again to stop at once)")


@dataclass
class _Loop:
    """What the loop's steps share (the functions below read and update it; callbacks never see it)."""
    run: Any
    accelerator: Accelerator
    model: torch.nn.Module          # as accelerate prepared it (DDP), or sharded (FSDP)
    unwrapped: torch.nn.Module      # the model itself (under FSDP the same sharded one)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    collate: Callable[[list[dict]], dict]
    state: TrainState
    budget: Budget | None
    cache: Any
    cache_seconds: float
    progress: Any = None
    main: bool = True               # the process that writes (rank 0)
    sharded: bool = False           # FSDP: each process holds a shard of the weights (fsdp.py)
    signals: _StopSignals = field(default_factory=_StopSignals)
    clock: float = 0.0              # perf_counter() minus the training seconds so far (evaluations excluded)
    stopped: str = "plan"
    eval_seconds: float | None = None   # one validation pass, once measured
    probe_seconds: float | None = None  # inference seconds per input, measured on one batch (time budget)
    save_seconds: float = 1.0           # one model save (a guess until measured)
    pending_loss: list = field(default_factory=list)   # read in bulk: reading a GPU number every step stalls it
    paced: deque = field(default_factory=lambda: deque(maxlen=BUDGET_PACE_STEPS))  # (step, training seconds)

    @property
    def metrics_log(self) -> Path:
        return self.run.run_dir / "metrics.jsonl"

    def wall(self) -> float:  # seconds since train() began, this session
        return time.perf_counter() - self.run.started

    def train_seconds(self) -> float:
        return time.perf_counter() - self.clock


def fit(run, on_evaluate: Callable[[int, dict], bool] | None = None) -> FitOutcome:
    """Train run.model as run.plan says (run: train.Setup); returns the trained state."""
    lp = _start(run)
    set_train_mode(lp.model)
    lp.progress = tqdm(total=run.plan.total_steps, initial=lp.state.step, desc="training", unit="step",
                       disable=None if lp.main else True, file=sys.stderr, dynamic_ncols=True)
    lp.clock = time.perf_counter() - lp.state.train_seconds
    stop = lp.state.step >= run.plan.total_steps or _out_of_time(lp)
    try:
        with lp.signals:
            while not stop and lp.state.epoch < run.plan.epochs:
                stop = _train_epoch(lp, on_evaluate)
    except KeyboardInterrupt:
        lp.progress.close()
        signum = lp.signals.received or signal.SIGINT
        saved = latest_checkpoint(run.run_dir)
        where = f"the checkpoint of step {read_state(saved).step} is kept" if saved else "no checkpoint yet"
        raise Interrupted(f"interrupted ({signal.Signals(signum).name}) at step {lp.state.step}, {where}; continue "
                          f"with: tunesmith train {run.run_dir}/config.yaml --resume {run.run_dir}", signum) from None
    lp.progress.close()
    if lp.cache is not None:
        lp.cache.close()
    seconds = lp.train_seconds() + lp.cache_seconds
    cache_summary = None if lp.cache is None else {
        "seconds": round(lp.cache_seconds, 2), "mib": round(lp.cache.nbytes / 2**20, 1),
        "memory_mapped": lp.cache.file is not None, "frozen_blocks": run.strategy.frozen_blocks}
    return FitOutcome(lp.state, lp.unwrapped, lp.collate, describe_groups(lp.optimizer),
                      count_parameters(lp.model)[0], seconds, lp.state.samples_seen / seconds if seconds > 0 else 0.0,
                      lp.state.extra.get("epoch_seconds", []), cache_summary, lp.stopped)


def _start(run) -> _Loop:
    """Accelerator, optimizer, schedule, the checkpoint to resume, the feature cache, the time budget."""
    cfg, plan, tcfg = run.cfg, run.plan, run.cfg.train
    accelerator = make_accelerator(run.precision)
    device = accelerator.device
    collate = run.task.make_collate(run.processor, pad_multiple(tcfg.pad_to_multiple_of, device))
    # FSDP: sharding replaces the parameters (DTensors holding this process's shard), so it comes before the
    # optimizer; accelerate is not asked to prepare the model (it forms FSDP on accelerators only, fsdp.py)
    sharded = fsdp.requested()
    if sharded:
        run.model = fsdp.shard(run.model, device)
    # fused AdamW: one pass over the weights per step. Measured on MiniLM (22.7M parameters) on a 2-core
    # CPU: 23 ms per step vs 118 ms for the default foreach implementation, same weights to 6e-8
    optimizer = torch.optim.AdamW(optimizer_groups(run.model, run.strategy), lr=plan.lr,
                                  fused=True if device.type in FUSED_ADAMW_DEVICES else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(plan, tcfg.scheduler))
    if sharded:
        model = unwrapped = run.model
    else:
        model, optimizer = accelerator.prepare(run.model, optimizer)
        unwrapped = accelerator.unwrap_model(model)
    if cfg.uses_fast_dropout(device.type):
        use_fast_dropout(unwrapped)  # torch's CPU dropout masks cost ~a seventh of a bf16 step (dropout.py)
    state = _resume(run, unwrapped, optimizer, scheduler) if run.resuming else None
    if state is not None and not sharded:  # the resume may have unfrozen layers (gradual unfreezing): DDP must see them
        model = _rewrap(accelerator, model, unwrapped)
    fresh = state is None
    main = accelerator.is_main_process
    if fresh and run.resuming and main:  # killed before its first checkpoint: nothing was trained, the log starts again
        (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    state = state or TrainState()
    trainable, total = count_parameters(model)
    log(f"model {cfg.model.name}: {count(total)} parameters, {count(trainable)} trainable; "
        f"precision {run.precision}; device {device}"
        + (f"; {accelerator.num_processes} processes ({'FSDP' if sharded else accelerator.distributed_type.value}, "
           f"{torch.distributed.get_backend()})" if accelerator.num_processes > 1 else ""))
    groups = describe_groups(optimizer)
    log(f"strategy {cfg.strategy.name}; learning rate per layer: "
        + ", ".join(f"{g['name']} {g['lr']:.3g}" for g in groups))
    if fresh and main:
        append_jsonl(run.run_dir / "metrics.jsonl", {
            "type": "setup", "step": 0, "strategy": cfg.strategy.name, "param_groups": groups,
            "trainable_parameters": trainable, "total_parameters": total,
            "plan": {"total_steps": plan.total_steps, "reason": plan.reason, "lr": plan.lr, "lr_reason": plan.lr_reason,
                     "dropout": plan.dropout}})
    cache, cache_seconds = _feature_cache(run, unwrapped, collate, device, sharded)
    budget = None
    if tcfg.time_limit:
        budget = Budget(tcfg.time_limit, state.extra.get("wall_seconds", 0.0))
        log(f"time limit {describe_seconds(tcfg.time_limit)}"
            + (f" ({describe_seconds(budget.spent_before)} used before this resume)" if budget.spent_before else ""))
    return _Loop(run, accelerator, model, unwrapped, optimizer, scheduler, collate, state, budget, cache, cache_seconds,
                 main=main, sharded=sharded)


def _rewrap(accelerator: Accelerator, model: torch.nn.Module, unwrapped: torch.nn.Module) -> torch.nn.Module:
    """DDP wrapped anew around the model after layers were unfrozen. DDP averages the gradients of the
    weights that were trainable when it was built; a layer unfrozen later would otherwise train on each
    process's own gradients and the copies drift apart. The optimizer changes identically everywhere
    (unfreeze() runs at the same step in every process); a new DDP also re-broadcasts rank 0's weights."""
    if accelerator.num_processes == 1:
        return model
    if model in accelerator._models:  # the old wrapper's gradient hooks go with it
        accelerator._models.remove(model)
    del model
    return accelerator.prepare_model(unwrapped)


def _resume(run, model: torch.nn.Module, optimizer, scheduler) -> TrainState | None:
    """The state of the newest whole checkpoint, loaded; None when the run was stopped before its first one."""
    main = distributed.is_main()
    if main:
        for folder in (run.run_dir, run.run_dir / "checkpoints"):  # we hold the run's lock: no write is in progress
            remove_stale_temps(folder)
    ckpt = resumable_checkpoint(run.run_dir)  # the newest whole one: damaged newer ones are skipped, with a warning
    if ckpt is None:
        log(f"{run.run_dir}: no checkpoint yet (stopped before the first one); training from step 0")
        return None
    saved = read_state(ckpt)
    n, trained_with = distributed.processes(), saved.extra.get("processes", 1)
    if trained_with != n:  # each process's share of every batch depends on how many there are
        again = f" --processes {trained_with}" if trained_with > 1 else ""
        raise TunesmithError(f"{run.run_dir}: trained with {trained_with} process(es), resumed with {n}; an epoch's "
                             f"batches are split by the number of processes, so resume with the same number: "
                             f"tunesmith train {run.run_dir}/config.yaml --resume {run.run_dir}{again}")
    sharded, trained_sharded = fsdp.requested(), saved.extra.get("fsdp", False)
    if sharded != trained_sharded:  # its optimizer state is keyed by parameter names under FSDP, by numbers without
        raise TunesmithError(f"{run.run_dir}: trained {'with' if trained_sharded else 'without'} FSDP, resumed "
                             f"{'with' if sharded else 'without'}; resume the same way: tunesmith train "
                             f"{run.run_dir}/config.yaml --resume {run.run_dir} --processes {trained_with}"
                             + (" --fsdp" if trained_sharded else ""))
    for layer in unfreeze_due(run.strategy, saved.step):  # the optimizer groups the checkpoint has
        unfreeze(run.strategy, model, optimizer, scheduler, layer)
    state = load_checkpoint(ckpt, model, optimizer, scheduler, distributed.rank())
    run.plan.set_total_steps(state.extra.get("total_steps", run.plan.total_steps))  # a time budget may have cut it
    if main:
        truncate_jsonl(run.run_dir / "metrics.jsonl", state.step)
    log(f"resumed from {ckpt} (step {state.step}/{run.plan.total_steps})")
    return state


def _train_epoch(lp: _Loop, on_evaluate) -> bool:
    """The rest of the current epoch (from a resumed position too); returns True when training must stop."""
    run, state, tcfg = lp.run, lp.state, lp.run.cfg.train
    train_enc = run.train_enc
    if run.cfg.augment:  # this epoch's copy, seeded by (seed, epoch, example): a resume redoes it
        train_enc = run.task.encode(run.processor, run.splits.train, run.cfg, train=True, epoch=state.epoch)
        if run.teacher is not None:  # unlabeled inputs too; the teacher sees only the inputs this epoch changed
            train_enc = epoch_inputs(run.teacher, run.task, run.processor, run.splits.train, train_enc, run.cfg,
                                     state.epoch)
    weights = run.balance.sample_weights
    if weights is not None and train_enc.doc_index is not None:  # chunked: a window weighs as its text
        weights = weights[np.asarray(train_enc.doc_index)]
    # the global batches: the same in every process (same seed), each process trains on its share
    batches = make_batches(train_enc.lengths, run.plan.batch_size, tcfg.seed + state.epoch,
                           run.cfg.groups_by_length(), weights)
    for batch_index in range(state.batch_in_epoch, len(batches)):
        last_of_epoch = batch_index + 1 == len(batches)
        stepping = (batch_index + 1) % tcfg.grad_accum_steps == 0 or last_of_epoch
        _forward_backward(lp, train_enc, batches[batch_index], stepping)
        state.batch_in_epoch = batch_index + 1
        if not stepping:
            continue  # accumulating gradients
        _optimizer_step(lp)
        if last_of_epoch:
            _end_epoch(lp)
        epoch_float = state.epoch + state.batch_in_epoch / len(batches)
        stop = _after_step(lp, last_of_epoch, epoch_float, on_evaluate)
        if stop or last_of_epoch:
            return stop
    return False


def _forward_backward(lp: _Loop, train_enc, batch_indices: list[int], stepping: bool) -> None:
    """Forward and backward on this process's share of a global batch; gradients are averaged over the
    processes only before an optimizer step (no_sync while accumulating: one all-reduce per step)."""
    run, accelerator = lp.run, lp.accelerator
    n = accelerator.num_processes
    indices = distributed.share(batch_indices, n, accelerator.process_index) if n > 1 else batch_indices
    # DDP averages the processes' gradients (a sum / n): a share's mean loss weighs len(share) * n / len(batch),
    # so the step is the mean over the whole global batch, as in one process, also when the shares differ by
    # one (a last batch of 37: 19 and 18). A process left without an example (a last batch smaller than n)
    # runs one with weight 0: every process must take part in each all-reduce
    weight = len(indices) * n / len(batch_indices)
    if not indices:
        indices = batch_indices[:1]
    features = [train_enc.features[i] for i in indices]
    batch = lp.collate(features)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    if lp.sharded:  # FSDP reduce-scatters the gradients (averaged, as DDP's all-reduce) only before a step
        lp.model.set_requires_gradient_sync(stepping)
    with accelerator.no_sync(lp.model) if not stepping and not lp.sharded else nullcontext():
        # accelerate puts bf16 autocast into the forward of a model it prepares; a sharded one it did not prepare
        with torch.autocast(accelerator.device.type, torch.bfloat16, enabled=lp.sharded and run.precision == "bf16"):
            with lp.cache.replay(indices, batch) if lp.cache else nullcontext():
                if run.teacher is not None:
                    loss = distill_loss(run.task, lp.model, batch, features,
                                        [run.teacher.targets[i] for i in indices], run.cfg, run.balance.loss)
                else:
                    loss = _training_loss(run.task, lp.model, batch, run.balance.loss)
        accelerator.backward(loss * (weight / run.cfg.train.grad_accum_steps))
    lp.pending_loss.append(loss.detach() * weight)
    lp.state.samples_seen += len(batch_indices)


def _optimizer_step(lp: _Loop) -> None:
    run, state, tcfg = lp.run, lp.state, lp.run.cfg.train
    if tcfg.max_grad_norm and lp.sharded:
        fsdp.clip_grad_norm_(lp.model, tcfg.max_grad_norm)
    elif tcfg.max_grad_norm:
        lp.accelerator.clip_grad_norm_(lp.model.parameters(), tcfg.max_grad_norm)
    lp.optimizer.step()
    lp.scheduler.step()
    lp.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    if "first_step" not in run.seconds:  # from train() to the end of this session's first step (timing.py)
        run.seconds["first_step"] = time.perf_counter() - run.started
    if lp.budget is not None:
        lp.paced.append((state.step, lp.train_seconds()))
        if len(lp.paced) > 2 and state.step % BUDGET_EVERY_STEPS == 0:
            _fit_the_budget(lp, "over the latest steps")
    lp.progress.update(1)
    # losses are read at the same steps in every process (reading them averages them over the processes)
    _log_training(lp)
    if state.step % 10 == 0:
        lp.progress.set_postfix(loss=f"{_read_losses(lp)[-1]:.4f}", refresh=False)
    if state.step % max(1, run.plan.total_steps // 20) == 0:
        losses = _read_losses(lp)
        if lp.progress.disable:  # a log file, not a terminal
            log(f"step {state.step}/{run.plan.total_steps}, loss {np.mean(losses[-20:]):.4f}, "
                f"{state.samples_seen / max(lp.train_seconds(), 1e-9):.1f} samples/s")
    unfrozen = unfreeze_due(run.strategy, state.step)
    for layer in unfrozen:
        lr = unfreeze(run.strategy, lp.unwrapped, lp.optimizer, lp.scheduler, layer)
        now_trainable = count_parameters(lp.unwrapped)[0]
        if lp.main:
            append_jsonl(lp.metrics_log, {"type": "unfreeze", "step": state.step, "layer": layer, "lr": lr,
                                          "trainable_parameters": now_trainable})
        log(f"step {state.step}: unfroze {layer} (lr {lr:.3g}); {count(now_trainable)} trainable")
    if unfrozen and not lp.sharded:  # FSDP reduces every gradient a backward produces: nothing to rebuild
        lp.model = _rewrap(lp.accelerator, lp.model, lp.unwrapped)
        set_train_mode(lp.model)


def _log_training(lp: _Loop) -> None:
    """Every planned_steps / TRAIN_LOG_POINTS steps, the mean loss of those steps and the learning rate
    (of the first layer group; the schedule scales every group alike) to metrics.jsonl, for the report's
    loss and learning-rate curves. 100 short lines; reading the losses syncs a GPU once per line."""
    state, every = lp.state, max(1, lp.run.plan.planned_steps // TRAIN_LOG_POINTS)
    if state.step % every:
        return
    # running holds the losses since the last evaluation (checkpointed): a resumed run writes the same lines
    recent = _read_losses(lp)[-every * lp.run.cfg.train.grad_accum_steps:]
    if recent and lp.main:
        append_jsonl(lp.metrics_log, {"type": "train", "step": state.step, "loss": float(np.mean(recent)),
                                      "lr": lp.scheduler.get_last_lr()[0]})


def _end_epoch(lp: _Loop) -> None:
    """Epoch time counts training only, like train_seconds."""
    state = lp.state
    now = lp.train_seconds()
    state.extra.setdefault("epoch_seconds", []).append(round(now - state.extra.get("epoch_start", 0.0), 3))
    state.extra["epoch_start"] = now
    state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def _after_step(lp: _Loop, last_of_epoch: bool, epoch_float: float, on_evaluate) -> bool:
    """Evaluate when due, stop at the end of the plan or the time budget, checkpoint; True: stop."""
    run, state, plan = lp.run, lp.state, lp.run.plan
    out_of_time, interrupted = _agree(lp, _out_of_time(lp))
    if out_of_time:
        lp.stopped = "time limit"
        log(f"step {state.step}: time limit {describe_seconds(lp.budget.limit)} reached; "
            "finishing with the best model so far")
    done = state.step >= plan.total_steps or out_of_time
    stop = False
    if done or ((state.step % plan.eval_every == 0) if plan.eval_every else last_of_epoch):
        state.train_seconds = lp.train_seconds()
        lp.model.eval()
        stop = _evaluate(lp, epoch_float, on_evaluate, last=done)
        set_train_mode(lp.model)
        lp.clock = time.perf_counter() - state.train_seconds
        if not done:
            _fit_the_budget(lp, "after an evaluation")
        stop, signalled = _agree(lp, stop)
        interrupted = interrupted or signalled
    stop = stop or done
    if interrupted or _checkpoint_due(lp, stop):  # the same answer in every process (agreed above)
        started = time.perf_counter()
        state.train_seconds = lp.train_seconds()
        state.extra["running_loss"] = _read_losses(lp)
        state.extra["total_steps"] = plan.total_steps
        state.extra["wall_seconds"] = (lp.budget.spent_before if lp.budget else 0.0) + lp.wall()
        state.extra["processes"] = lp.accelerator.num_processes
        state.extra["fsdp"] = lp.sharded
        rng = distributed.gather(rng_state())  # each process's random state: a resume continues each one's stream
        # FSDP: the whole weights and optimizer state, gathered to the main process (every process takes part)
        weights, optim = fsdp.full_state(lp.model, lp.optimizer) if lp.sharded else (lp.unwrapped, lp.optimizer)
        if lp.main:
            save_checkpoint(run.run_dir, weights, optim, lp.scheduler, state, rng)
        distributed.barrier()  # saved before any process goes on (a failed save stops the main process here)
        run.seconds["checkpoints"] = run.seconds.get("checkpoints", 0.0) + time.perf_counter() - started
    if interrupted:  # the step is complete and saved: fit() says how to resume
        raise KeyboardInterrupt
    return stop


def _agree(lp: _Loop, flag: bool) -> tuple[bool, bool]:
    """(flag in any process, a stop signal in any process), with the main process's plan length (a time
    budget re-plans on each process's own clock): every process then stops, evaluates and saves at the same
    step. One small all-reduce; nothing in one process."""
    plan = lp.run.plan
    if lp.accelerator.num_processes == 1:
        return flag, lp.signals.received is not None
    signal_number, flag_any, total = distributed.all_max(
        [lp.signals.received or 0, float(flag), plan.total_steps if lp.main else 0], lp.accelerator.device)
    if signal_number and lp.signals.received is None:
        lp.signals.received = int(signal_number)  # another process got it (a scheduler may signal only one)
    if int(total) != plan.total_steps:
        plan.set_total_steps(int(total))
        lp.progress.total = plan.total_steps
    return bool(flag_any), bool(signal_number)


def _checkpoint_due(lp: _Loop, stop: bool) -> bool:
    """Every train.checkpoint_every_steps, not at every epoch end: small data has many short epochs, and a
    checkpoint (weights and optimizer state: 270 MB for MiniLM) every few steps cost more than the training.
    At the end only where something may resume from it: a run that ends by its plan, early stopping or a
    callback has its model in memory (the best one in model/ already), and a kill before metrics.json is
    written resumes from the checkpoint before and trains the same steps again. A time limit's stop and
    train.keep_checkpoints keep the last checkpoint."""
    tcfg = lp.run.cfg.train
    if lp.state.step % tcfg.checkpoint_every_steps == 0:
        return True
    return stop and (lp.stopped == "time limit" or tcfg.keep_checkpoints)


def _read_losses(lp: _Loop) -> list[float]:
    """The training losses of the steps so far (each the mean over its global batch: averaged over the
    processes here, in bulk)."""
    running = lp.state.extra.setdefault("running_loss", [])
    if lp.pending_loss:
        running.extend(distributed.all_mean(torch.stack(lp.pending_loss).float()).tolist())
        lp.pending_loss.clear()
    return running


def _evaluate(lp: _Loop, epoch_float: float, on_evaluate, last: bool = False) -> bool:
    """Validate, log, keep the best model; returns True when early stopping or the callback says stop. The
    last evaluation of a run (the plan's end, the time limit) is always a candidate for the best model."""
    run, state, plan, cfg = lp.run, lp.state, lp.run.plan, lp.run.cfg
    record: dict[str, Any] = {"type": "eval", "step": state.step, "epoch": round(epoch_float, 4),
                              "lr": lp.scheduler.get_last_lr()[0]}
    running = _read_losses(lp)
    if running:
        record["train_loss"] = float(np.mean(running))
        running.clear()
    if run.val_enc is None:
        if lp.main:
            append_jsonl(lp.metrics_log, record)
        return False
    started = time.perf_counter()
    # the plain model, not DDP's wrapper (whose forward would sync buffers: a collective per batch, and the
    # processes run different numbers of validation batches); each process runs its share, gathered
    outputs, loss = example_outputs(lp.unwrapped, run.task, run.val_enc, lp.collate, cfg.train.eval_batch_size,
                                    lp.accelerator.device, run.precision, cfg.model.chunk_aggregation, with_loss=True,
                                    spread=True)
    full = run.task.compute_metrics(outputs, run.splits.validation.targets, run.labels)
    lp.eval_seconds = time.perf_counter() - started
    scores = {"loss": loss, **scalar_metrics(full)}  # a task's own loss (per token, language models) wins
    record["validation"] = scores
    if lp.main:
        append_jsonl(lp.metrics_log, record)
    value = scores[run.metric]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k in (run.metric, "loss", "accuracy"))
    if state.step < plan.best_from_step and not last:
        log(f"step {state.step}: validation {shown} (the best model is chosen from step {plan.best_from_step} on)")
    elif is_improvement(run.metric, value, state.best_metric):
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        state.extra["best_validation_metrics"], state.extra["best_validation_step"] = full, state.step
        started = time.perf_counter()
        weights = fsdp.full_state(lp.model)[0] if lp.sharded else None  # every process: the shards are gathered
        if lp.main:
            save_model_dir(run.run_dir / "model", lp.unwrapped, run.processor, cfg, run.labels, run.task, weights)
        lp.save_seconds = time.perf_counter() - started
        log(f"step {state.step}: validation {shown} (best so far, saved)")
    else:
        if state.step >= plan.patience_from_step:  # patience counts only once stopping is allowed
            state.evals_without_improvement += 1
        log(f"step {state.step}: validation {shown}")
    if on_evaluate is not None and on_evaluate(state.step, scores):
        lp.stopped = "callback"
        return True
    if plan.patience is not None and state.evals_without_improvement >= plan.patience:
        log(f"step {state.step}: no improvement of validation {run.metric} in {plan.patience} evaluations: "
            f"early stopping (best: step {state.best_step}, {run.metric} {state.best_metric:.4f})")
        lp.stopped = "early stopping"
        return True
    return False


# ---------------------------------------------------------------- the time budget

def _pace(lp: _Loop) -> float:
    """Seconds per optimizer step over the latest steps of this session (evaluations excluded)."""
    if len(lp.paced) < 2:
        return 0.0
    (first_step, first_time), (last_step, last_time) = lp.paced[0], lp.paced[-1]
    return (last_time - first_time) / max(1, last_step - first_step)


def _inference_seconds_per_input(lp: _Loop) -> float:
    """What evaluating one input costs: from the latest validation pass, else timed once on one batch.
    (A guess from the training pace, taken over the first steps of a loaded machine, once reserved more
    time for the final evaluation than the whole budget and stopped the run at step 2.)"""
    run = lp.run
    if lp.eval_seconds and run.val_enc is not None:
        return lp.eval_seconds / max(1, len(run.val_enc.features))
    if lp.probe_seconds is None:
        enc = run.val_enc if run.val_enc is not None else run.train_enc
        n = max(1, min(len(enc.features), run.cfg.train.eval_batch_size))
        started = time.perf_counter()
        lp.model.eval()  # no dropout: the probe draws no random numbers, so resumed runs stay exact
        predict_outputs(lp.unwrapped, run.task, enc.features[:n], enc.lengths[:n], lp.collate, n,
                        lp.accelerator.device, run.precision)
        set_train_mode(lp.model)
        seconds = time.perf_counter() - started
        lp.clock += seconds  # not training time
        lp.probe_seconds = seconds / n
    return lp.probe_seconds


def _reserve(lp: _Loop) -> float:
    """Seconds the end of the run needs after training: the last validation, the test split, saving."""
    run = lp.run
    per_example = _inference_seconds_per_input(lp)
    n_test = len(run.splits.test) if run.splits.test is not None else 0
    n_val = len(run.val_enc.features) if run.val_enc is not None else 0
    return lp.save_seconds + FINISH_SECONDS + per_example * (n_test + n_val)


def _out_of_time(lp: _Loop) -> bool:
    return lp.budget is not None and lp.budget.over(lp.wall(), _reserve(lp))


def _fit_the_budget(lp: _Loop, note: str) -> None:
    """Fit the plan to what is left of the time budget at the speed measured in this session:
    evaluations and checkpoints included, never beyond the original plan."""
    run, plan, state = lp.run, lp.run.plan, lp.state
    if lp.budget is None or len(lp.paced) < 2:
        return
    per_step = _pace(lp)  # training + checkpoints
    if run.val_enc is not None:  # plus a share of each evaluation
        eval_seconds = lp.eval_seconds or _inference_seconds_per_input(lp) * len(run.val_enc.features)
        per_step += eval_seconds / (plan.eval_every or plan.steps_per_epoch)
    fits = state.step + lp.budget.steps_that_fit(lp.wall(), per_step, _reserve(lp))
    new_total = min(plan.planned_steps, max(state.step + 1, fits))
    if new_total == plan.total_steps:
        return
    old = plan.total_steps
    plan.set_total_steps(new_total)
    state.extra["total_steps"] = plan.total_steps
    lp.progress.total = plan.total_steps
    if abs(new_total - old) >= 0.05 * old:  # the first cut, and any large change
        log(f"time limit {describe_seconds(lp.budget.limit)}: {plan.total_steps} of the {plan.planned_steps} planned "
            f"steps fit ({per_step:.2f}s per step {note}); the learning-rate schedule ends there")


def _training_loss(task, model: torch.nn.Module, batch: dict, loss_fn) -> torch.Tensor:
    """The model's own loss, or (class weights, focal loss) loss_fn on its logits; validation always
    reports the plain loss."""
    if loss_fn is None:
        return task.forward(model, batch)[1]
    logits, _ = task.forward(model, {k: v for k, v in batch.items() if k != "labels"})
    return loss_fn(logits, batch["labels"])


def _feature_cache(run, model: torch.nn.Module, collate, device: torch.device, sharded: bool = False):
    """Cached outputs of the frozen bottom blocks (strategy.cache_features), or (None, 0)."""
    if not (run.strategy.bottom_frozen and run.cfg.strategy.cache_features == "auto"):
        return None, 0.0
    if sharded:  # the cache swaps modules out of the model; FSDP's units (and their gathers) must stay as built
        log("feature cache off under FSDP: the frozen blocks run in every step")
        return None, 0.0
    if run.cfg.augment or run.train_enc.inputs_vary:
        log("feature cache off: " + ("augmentation changes the training inputs every epoch" if run.cfg.augment
                                     else "the training inputs are drawn anew for every batch (masking)"))
        return None, 0.0
    started = time.perf_counter()
    # every process caches all the examples (any may draw any of them); each its own file if one is needed
    name = "feature_cache.f32" if distributed.is_main() else f"feature_cache-{distributed.rank()}.f32"
    cache = build_feature_cache(run.strategy, model, run.train_enc.features, run.train_enc.lengths, collate,
                                run.cfg.train.eval_batch_size, device, run.precision, run.run_dir, name)
    seconds = time.perf_counter() - started
    if not cache:  # too large for memory and disk: it says why (logged when it was declined)
        return None, 0.0
    log(f"cached the outputs of the {run.strategy.frozen_blocks} frozen block(s) for {len(run.train_enc.features)} "
        f"examples in {seconds:.1f}s ({cache.nbytes / 2**20:.0f} MiB, "
        f"{'memory-mapped file' if cache.file else 'in memory'}); the top trains from the cache")
    return cache, seconds
