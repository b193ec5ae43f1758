"""fit(): THE training loop, read top to bottom; the one place that knows accelerate.

for each epoch: length-grouped batches -> forward/backward (bf16 autocast where fast) -> clip, step ->
evaluate at the planned steps / keep the best model / stop early or at the time budget -> checkpoint.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import TrainState, latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .errors import TunesmithError
from .evaluate import is_improvement, scalar_metrics
from .features import build_feature_cache
from .inference import example_logits, pad_multiple, save_model_dir
from .models import count_parameters
from .runlog import append_jsonl, count, log, truncate_jsonl
from .schedule import Budget, describe_seconds, lr_factor
from .strategies import describe_groups, optimizer_groups, set_train_mode, unfreeze, unfreeze_due

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel we measured; others use foreach
BUDGET_EVERY_STEPS = 10     # a time budget re-plans the run this often (and after every evaluation) ...
BUDGET_PACE_STEPS = 50      # ... at the pace of the latest steps, not of the slower first ones
FINISH_SECONDS = 0.5        # loading the best model back and writing the summary (time budget)


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

    wanted = "bf16" if precision == "bf16" else "no"
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != wanted:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=wanted)


def fit(run, on_evaluate: Callable[[int, dict], bool] | None = None) -> FitOutcome:
    """Train run.model as run.plan says (run: train.Setup); returns the trained state."""
    cfg, task, plan, tcfg = run.cfg, run.task, run.plan, run.cfg.train
    accelerator = make_accelerator(run.precision)
    device = accelerator.device
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    multiple = pad_multiple(tcfg.pad_to_multiple_of, device)
    collate = lambda feats: task.collate(feats, pad_id, multiple)  # noqa: E731
    # fused AdamW: one pass over the weights per step. Measured on MiniLM (22.7M parameters) on a 2-core
    # CPU: 23 ms per step vs 118 ms for the default foreach implementation, same weights to 6e-8
    optimizer = torch.optim.AdamW(optimizer_groups(run.model, run.strategy), lr=plan.lr,
                                  fused=True if device.type in FUSED_ADAMW_DEVICES else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(plan, tcfg.scheduler))
    model, optimizer = accelerator.prepare(run.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    metrics_log = run.run_dir / "metrics.jsonl"

    state = TrainState()
    if run.resuming:
        ckpt = latest_checkpoint(run.run_dir)
        if ckpt is None:
            raise TunesmithError(f"{run.run_dir}: no checkpoint to resume from")
        for layer in unfreeze_due(run.strategy, read_state(ckpt).step):  # the optimizer groups the checkpoint has
            unfreeze(run.strategy, unwrapped, optimizer, scheduler, layer)
        state = load_checkpoint(ckpt, unwrapped, optimizer, scheduler)
        plan.total_steps = state.extra.get("total_steps", plan.total_steps)  # a time budget may have cut it
        truncate_jsonl(metrics_log, state.step)
        log(f"resumed from {ckpt} (step {state.step}/{plan.total_steps})")
    trainable, total = count_parameters(model)
    log(f"model {cfg.model.name}: {count(total)} parameters, {count(trainable)} trainable; "
        f"precision {run.precision}; device {device}")
    groups = describe_groups(optimizer)
    log(f"strategy {cfg.strategy.name}; learning rate per layer: "
        + ", ".join(f"{g['name']} {g['lr']:.3g}" for g in groups))
    if not run.resuming:
        append_jsonl(metrics_log, {"type": "setup", "step": 0, "strategy": cfg.strategy.name, "param_groups": groups,
                                   "trainable_parameters": trainable, "total_parameters": total,
                                   "plan": {"total_steps": plan.total_steps, "reason": plan.reason,
                                            "lr": plan.lr, "lr_reason": plan.lr_reason}})
    cache, cache_seconds = _feature_cache(run, unwrapped, collate, device)
    budget = None
    if tcfg.time_limit:
        budget = Budget(tcfg.time_limit, state.extra.get("wall_seconds", 0.0))
        log(f"time limit {describe_seconds(tcfg.time_limit)}"
            + (f" ({describe_seconds(budget.spent_before)} used before this resume)" if budget.spent_before else ""))

    def wall() -> float:  # this session's seconds since train() began
        return time.perf_counter() - run.started

    eval_cost: dict[str, Any] = {"seconds": None}  # one validation pass and one model save, once measured

    def evaluate_now(epoch_float: float, running_loss: list[float]) -> bool:
        """Validate, log, keep the best model; returns True when early stopping or the callback says stop."""
        record: dict[str, Any] = {"type": "eval", "step": state.step, "epoch": round(epoch_float, 4),
                                  "lr": scheduler.get_last_lr()[0]}
        if running_loss:
            record["train_loss"] = float(np.mean(running_loss))
            running_loss.clear()
        if run.val_enc is None:
            append_jsonl(metrics_log, record)
            return False
        eval_started = time.perf_counter()
        logits, loss = example_logits(model, task, run.val_enc, collate, tcfg.eval_batch_size, device,
                                      run.precision, cfg.model.chunk_aggregation, with_loss=True)
        full = task.compute_metrics(logits, run.splits.validation.targets, run.labels)
        eval_cost["seconds"] = time.perf_counter() - eval_started
        scores = scalar_metrics(full)
        scores["loss"] = loss
        record["validation"] = scores
        append_jsonl(metrics_log, record)
        value = scores[run.metric]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k in (run.metric, "loss", "accuracy"))
        if is_improvement(run.metric, value, state.best_metric):
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
            state.extra["best_validation_metrics"], state.extra["best_validation_step"] = full, state.step
            save_started = time.perf_counter()
            save_model_dir(run.run_dir / "model", unwrapped, run.tokenizer, cfg, run.labels)
            eval_cost["save"] = time.perf_counter() - save_started
            log(f"step {state.step}: validation {shown} (best so far, saved)")
        else:
            if state.step >= plan.patience_from_step:  # patience counts only once stopping is allowed
                state.evals_without_improvement += 1
            log(f"step {state.step}: validation {shown}")
        if on_evaluate is not None and on_evaluate(state.step, scores):
            stopped[0] = "callback"
            return True
        if plan.patience is not None and state.evals_without_improvement >= plan.patience:
            log(f"step {state.step}: no improvement of validation {run.metric} in {plan.patience} evaluations: "
                f"early stopping (best: step {state.best_step}, {run.metric} {state.best_metric:.4f})")
            stopped[0] = "early stopping"
            return True
        return False

    def reserve() -> float:
        """Seconds the end of the run needs after training: the test evaluation and saving."""
        per_example = (eval_cost["seconds"] / max(1, len(run.val_enc.features))) if eval_cost["seconds"] and run.val_enc \
            else None
        if per_example is None:  # no evaluation yet: a forward pass costs about a third of a training step
            per_example = pace() / tcfg.batch_size / 3
        test = run.splits.test
        n_test = len(test.texts) if test is not None else 0
        n_val = len(run.val_enc.features) if run.val_enc is not None else 0
        # the last validation, the test split, and saving the model (once measured; a second before)
        return eval_cost.get("save", 1.0) + FINISH_SECONDS + per_example * (n_test + n_val)

    def pace() -> float:
        """Seconds per optimizer step over the latest steps of this session (evaluations excluded)."""
        if len(paced) < 2:
            return 0.0
        (first_step, first_time), (last_step, last_time) = paced[0], paced[-1]
        return (last_time - first_time) / max(1, last_step - first_step)

    def fit_the_budget(note: str) -> None:
        """Fit the plan to what is left of the time budget at the speed measured in this session:
        evaluations and checkpoints included, never beyond the original plan."""
        if budget is None or len(paced) < 2:
            return
        per_step = pace()  # training + checkpoints
        if run.val_enc is not None:  # plus a share of each evaluation
            eval_seconds = eval_cost["seconds"]
            if eval_seconds is None:  # not measured yet: a forward pass costs about a third of a step
                eval_seconds = per_step * len(run.val_enc.features) / tcfg.batch_size / 3
            per_step += eval_seconds / (plan.eval_every or plan.steps_per_epoch)
        fits = state.step + budget.steps_that_fit(wall(), per_step, reserve())
        new_total = min(plan.planned_steps, max(state.step + 1, fits))
        if new_total == plan.total_steps:
            return
        old, plan.total_steps = plan.total_steps, new_total
        plan.patience_from_step = min(plan.patience_from_step, plan.total_steps // 2)
        state.extra["total_steps"] = plan.total_steps
        progress.total = plan.total_steps
        if abs(new_total - old) >= 0.05 * old:  # the first cut, and any large change
            log(f"time limit {describe_seconds(budget.limit)}: {plan.total_steps} of the {plan.planned_steps} planned "
                f"steps fit ({per_step:.2f}s per step {note}); the learning-rate schedule ends there")

    # ---- the loop
    set_train_mode(model)
    epoch_seconds: list[float] = state.extra.setdefault("epoch_seconds", [])
    running_loss: list[float] = state.extra.pop("running_loss", [])
    pending_loss: list[torch.Tensor] = []  # read in bulk: reading a GPU number every step would stall the GPU
    stopped = ["plan"]

    def read_losses() -> list[float]:
        if pending_loss:
            running_loss.extend(torch.stack(pending_loss).float().tolist())
            pending_loss.clear()
        return running_loss

    train_enc = run.train_enc
    started = time.perf_counter() - state.train_seconds
    paced: deque[tuple[int, float]] = deque(maxlen=BUDGET_PACE_STEPS)  # (step, training seconds) of this session
    stop = state.step >= plan.total_steps or (budget is not None and budget.over(wall(), reserve()))
    progress = tqdm(total=plan.total_steps, initial=state.step, desc="training", unit="step",
                    disable=None, file=sys.stderr, dynamic_ncols=True)
    try:
        while not stop and state.epoch < plan.epochs:
            if run.augmenter is not None:  # this epoch's copy, seeded by (seed, epoch, example): a resume redoes it
                train_enc = task.encode(run.tokenizer, run.augmenter.apply(task, run.splits.train, state.epoch),
                                        run.max_len, run.stride)
            weights = run.balance.sample_weights
            if weights is not None and train_enc.doc_index is not None:  # chunked: a window weighs as its text
                weights = weights[np.asarray(train_enc.doc_index)]
            batches = make_batches(train_enc.lengths, tcfg.batch_size, tcfg.seed + state.epoch,
                                   tcfg.group_by_length, weights)
            for batch_index in range(state.batch_in_epoch, len(batches)):
                batch = collate([train_enc.features[i] for i in batches[batch_index]])
                batch = {k: v.to(device) for k, v in batch.items()}
                with cache.replay(batches[batch_index], batch["input_ids"].shape[1]) if cache else nullcontext():
                    if run.balance.loss is None:
                        loss = model(**batch).loss
                    else:  # weighted or focal loss, from the logits (validation keeps the model's plain loss)
                        targets = batch.pop("labels")
                        loss = run.balance.loss(model(**batch).logits, targets)
                accelerator.backward(loss / tcfg.grad_accum_steps)
                pending_loss.append(loss.detach())
                state.batch_in_epoch = batch_index + 1
                state.samples_seen += len(batches[batch_index])
                last_of_epoch = state.batch_in_epoch == len(batches)
                if state.batch_in_epoch % tcfg.grad_accum_steps and not last_of_epoch:
                    continue
                if tcfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if budget is not None:
                    paced.append((state.step, time.perf_counter() - started))
                    if len(paced) > 2 and state.step % BUDGET_EVERY_STEPS == 0:
                        fit_the_budget("over the latest steps")
                progress.update(1)
                if state.step % 10 == 0:
                    progress.set_postfix(loss=f"{read_losses()[-1]:.4f}", refresh=False)
                if progress.disable and state.step % max(1, plan.total_steps // 20) == 0:  # a log file, not a terminal
                    elapsed = time.perf_counter() - started
                    log(f"step {state.step}/{plan.total_steps}, loss {np.mean(read_losses()[-20:]):.4f}, "
                        f"{state.samples_seen / max(elapsed, 1e-9):.1f} samples/s")
                for layer in unfreeze_due(run.strategy, state.step):
                    lr = unfreeze(run.strategy, unwrapped, optimizer, scheduler, layer)
                    set_train_mode(model)
                    now_trainable = count_parameters(model)[0]
                    append_jsonl(metrics_log, {"type": "unfreeze", "step": state.step, "layer": layer, "lr": lr,
                                               "trainable_parameters": now_trainable})
                    log(f"step {state.step}: unfroze {layer} (lr {lr:.3g}); {count(now_trainable)} trainable")
                if last_of_epoch:  # epoch time counts training only, like train_seconds
                    now = time.perf_counter() - started
                    epoch_seconds.append(round(now - state.extra.get("epoch_start", 0.0), 3))
                    state.extra["epoch_start"] = now
                    state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                epoch_float = state.epoch + state.batch_in_epoch / len(batches)
                out_of_time = budget is not None and budget.over(wall(), reserve())
                if out_of_time:
                    stopped[0] = "time limit"
                    log(f"step {state.step}: time limit {describe_seconds(budget.limit)} reached; "
                        "finishing with the best model so far")
                done = state.step >= plan.total_steps or out_of_time
                eval_due = (state.step % plan.eval_every == 0) if plan.eval_every else last_of_epoch
                if eval_due or done:
                    state.train_seconds = time.perf_counter() - started
                    model.eval()
                    stop = evaluate_now(epoch_float, read_losses())
                    set_train_mode(model)
                    started = time.perf_counter() - state.train_seconds
                    if not done:
                        fit_the_budget("after an evaluation")
                stop = stop or done
                if stop or last_of_epoch or state.step % tcfg.checkpoint_every_steps == 0:
                    state.train_seconds = time.perf_counter() - started
                    state.extra["running_loss"] = read_losses()
                    state.extra["total_steps"] = plan.total_steps
                    state.extra["wall_seconds"] = (budget.spent_before if budget else 0.0) + wall()
                    save_checkpoint(run.run_dir, unwrapped, optimizer, scheduler, state)
                if stop or last_of_epoch:
                    break
    except KeyboardInterrupt:
        progress.close()
        raise TunesmithError(f"interrupted; continue with: tunesmith train {run.run_dir}/config.yaml "
                             f"--resume {run.run_dir}") from None
    progress.close()
    if cache is not None:
        cache.close()
    train_seconds = time.perf_counter() - started + cache_seconds
    cache_summary = None if cache is None else {
        "seconds": round(cache_seconds, 2), "mib": round(cache.nbytes / 2**20, 1),
        "memory_mapped": cache.file is not None, "frozen_blocks": run.strategy.frozen_blocks}
    return FitOutcome(state, unwrapped, collate, describe_groups(optimizer), count_parameters(model)[0],
                      train_seconds, state.samples_seen / train_seconds if train_seconds > 0 else 0.0,
                      epoch_seconds, cache_summary, stopped[0])


def _feature_cache(run, model: torch.nn.Module, collate, device: torch.device):
    """Cached outputs of the frozen bottom blocks (strategy.cache_features), or (None, 0)."""
    if not (run.strategy.bottom_frozen and run.cfg.strategy.cache_features == "auto"):
        return None, 0.0
    if run.augmenter is not None:
        log("feature cache off: augmentation changes the training texts every epoch")
        return None, 0.0
    started = time.perf_counter()
    cache = build_feature_cache(run.strategy, model, run.train_enc.features, run.train_enc.lengths, collate,
                                run.cfg.train.eval_batch_size, device, run.precision, run.run_dir)
    seconds = time.perf_counter() - started
    log(f"cached the outputs of the {run.strategy.frozen_blocks} frozen block(s) for {len(run.train_enc.features)} "
        f"examples in {seconds:.1f}s ({cache.nbytes / 2**20:.0f} MiB, "
        f"{'memory-mapped file' if cache.file else 'in memory'}); the top trains from the cache")
    return cache, seconds
