"""How long to train and how fast: the plan in optimizer steps, when to evaluate and stop early, the
learning rate of a strategy, the learning-rate schedule, and fitting the plan into a time budget.

The numbers behind the automatic choices are measured (docs/defaults.md has the table):
- small data needs a minimum number of optimizer steps, not a number of epochs: at 1 epoch, 1,080
  Rotten Tomatoes reviews (34 steps) gave a majority-class model, while the same rows trained for
  AUTO_MIN_STEPS steps learned; large data gets one and a half passes, already more steps than that;
- the rate that works depends on how many weights learn, on the kind of model and on the batch size:
  each task gives its own table (task.auto_lr; text: tasks/text.py, images: tasks/image_classification.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import Config
from .errors import TunesmithError

# 10 million steps: at 20 steps a second (a small model on a GPU) almost six days; a plan beyond it without a
# time limit is a typo (epochs: 1e9), refused before anything is written
MAX_PLANNED_STEPS = 10_000_000
AUTO_MIN_STEPS = 300        # optimizer steps planned at least with epochs: auto
AUTO_SMALL_BATCH, AUTO_BATCH = 16, 32  # batch_size: auto: 16 while 300 steps of 16 do not reach one pass
AUTO_SMALL_DATA = AUTO_MIN_STEPS * AUTO_SMALL_BATCH  # 4,800 training inputs
AUTO_MAX_EPOCHS = 40        # ... but no more passes than this over tiny data (early stopping ends most sooner)
# ... and on large data one and a half passes: the whole Rotten Tomatoes train split (281 steps of 32 per pass),
# macro F1 0.816 +- 0.004 in 1 pass, 0.818 +- 0.005 in 1.5 (0.822 +- 0.000 with 500 rows held out instead of
# 1,000), for 1.45x the training time; the Trainer's 3 passes of batch 8: 0.824 +- 0.005 over 6 seeds. Two passes
# gained 0.35 points over the same 4 seeds (0.819 against 0.815 with today's dropout masks) for a third more time
# (bench/README.md, seventh follow-up)
AUTO_LARGE_DATA_EPOCHS = 1.5
# A plan of at most this many passes over the data (epochs: auto over large data) sees each example once or twice,
# too few times to learn it by heart, so (1) dropout: auto is none there: on the whole Rotten Tomatoes split macro
# F1 rose on 7 of 8 seeds, 0.816 -> 0.822 (at 1.8 passes, 3,000 reviews, it did not: 0.794 -> 0.790 over 3); and
# (2) with epochs: auto the best model is chosen from the evaluations of the plan's second half, before which the
# model has not seen all its data once: a 500-row validation split's noise (a standard error of 1.7 points at 83%
# accuracy) had picked a step-112 model of 446 that scored 3 points under the later ones (bench/README.md, eighth
# follow-up)
AUTO_FEW_PASSES = 1.5
AUTO_PATIENCE = 3           # evaluations without improvement before stopping (epochs: auto)
AUTO_MAX_EVALS = 10         # evaluations per run at most (epochs: auto) ...
AUTO_MIN_EVALS = 3          # ... and at least, when the validation split is large
EVAL_TIME_SHARE = 0.1       # evaluation may cost about this share of the training time
EVAL_COST_PER_EXAMPLE = 1 / 3   # evaluating an example costs about a third of training on it (forward only)


@dataclass
class TrainingPlan:
    """The run in optimizer steps. total_steps may shrink during training to fit a time budget."""
    batch_size: int             # the global batch: train.batch_size per process x processes
    steps_per_epoch: int
    total_steps: int            # where the learning-rate schedule ends (a time budget may move it)
    planned_steps: int          # the plan before any time budget
    warmup_steps: int
    eval_every: int | None      # steps between evaluations; None: at the end of every epoch
    patience: int | None        # evaluations without improvement before stopping; None: never
    patience_from_step: int     # early stopping is not considered before this step
    lr: float
    reason: str                 # why this plan, for the run log
    lr_reason: str
    processes: int = 1          # processes training together (DDP), each on batch_size / processes
    dropout: float | None = None  # every dropout layer's probability while training; None: the model's own
    dropout_reason: str = "train.dropout: model"
    best_from_step: int = 0     # evaluations before this step are logged, but never kept as the best model

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def set_total_steps(self, total: int) -> None:
        """Move the end of the schedule (a time budget re-plans it; several processes take the main one's).
        Where the plan starts early stopping and the choice of the best model at half of it, they stay at half
        of the new length: a run cut short keeps choosing from its own second half, and a plan that grows back
        after a slow start does not keep an early cut's start. (A moved value is never 0: total >= 2 here.)"""
        self.total_steps = total
        if self.patience_from_step:
            self.patience_from_step = total // 2
        if self.best_from_step:
            self.best_from_step = total // 2


def resolve_lr(cfg: Config, task, batch_size: int) -> tuple[float, str]:
    """train.lr, or for auto the rate measured to work for the task, strategy and batch size, and why."""
    if cfg.train.lr != "auto":
        return float(cfg.train.lr), "train.lr"
    return task.auto_lr(cfg.strategy.name, batch_size), f"auto for strategy {cfg.strategy.name} at batch {batch_size}"


def make_plan(cfg: Config, task, train_features: int, validation_examples: int, processes: int = 1) -> TrainingPlan:
    """Steps, evaluations and early stopping for `train_features` training inputs (windows of long
    texts count one each) and a validation split of `validation_examples`. With several processes,
    train.batch_size is each one's: the plan (steps, automatic learning rate) is made for the global batch."""
    tcfg = cfg.train
    batch_size = resolve_batch_size(cfg, train_features) * processes
    batches = math.ceil(train_features / batch_size)
    steps_per_epoch = max(1, math.ceil(batches / tcfg.grad_accum_steps))
    auto = tcfg.epochs == "auto"
    if tcfg.max_steps:
        total, reason = tcfg.max_steps, f"train.max_steps {tcfg.max_steps}"
    elif auto:
        min_steps = task.auto_min_steps()
        total = auto_steps(steps_per_epoch, min_steps)
        epochs = total / steps_per_epoch
        shown = f"{epochs:.0f}" if epochs >= 2 else f"{epochs:.2g}"
        reason = (f"{train_features} training inputs, {steps_per_epoch} step(s) per epoch: {shown} epoch(s) "
                  f"planned (epochs auto: at least {min_steps} steps, at most {AUTO_MAX_EPOCHS} epochs)")
    else:
        total = max(1, math.ceil(tcfg.epochs * steps_per_epoch))
        reason = f"train.epochs {tcfg.epochs:g}"
    if total > MAX_PLANNED_STEPS and not tcfg.time_limit:
        raise TunesmithError(f"{reason}: {total:,} optimizer steps planned ({steps_per_epoch:,} per epoch); more "
                             f"than {MAX_PLANNED_STEPS:,} is taken for a mistake: lower it, or set train.time_limit "
                             "to train for a fixed time")
    eval_every = _eval_every(tcfg.eval_every_steps, auto, total, validation_examples, batch_size)
    patience = tcfg.early_stopping_patience
    if patience == "auto":
        patience = AUTO_PATIENCE if auto and validation_examples else None
    passes = total / steps_per_epoch
    few_passes = total <= math.ceil(AUTO_FEW_PASSES * steps_per_epoch)  # 446 steps of 297 a pass count as 1.5
    best_from = total // 2 if auto and validation_examples and few_passes else 0
    if best_from:
        reason += f", best model chosen from step {best_from} on (half the plan: under one pass before it)"
    if patience:
        reason += f", early stopping patience {patience}" + (" after half the plan" if auto else "")
    lr, lr_reason = resolve_lr(cfg, task, batch_size)
    dropout, dropout_reason = resolve_dropout(cfg, passes, few_passes)
    return TrainingPlan(batch_size, steps_per_epoch, total, total, round(tcfg.warmup_ratio * total), eval_every, patience,
                        total // 2 if auto else 0, lr, reason, lr_reason, processes, dropout, dropout_reason, best_from)


def resolve_dropout(cfg: Config, passes: float, few_passes: bool) -> tuple[float | None, str]:
    """train.dropout for a plan of `passes` over the training data (few_passes: at most AUTO_FEW_PASSES):
    (probability, or None for the model's own; why)."""
    setting = cfg.train.dropout
    if setting == "model":
        return None, "train.dropout: model"
    if setting != "auto":
        return float(setting), "train.dropout"
    if few_passes:
        return 0.0, f"auto: {passes:.2g} pass(es) over the data, at most {AUTO_FEW_PASSES:g}"
    return None, f"auto: {passes:.2g} passes over the data, more than {AUTO_FEW_PASSES:g}"


def resolve_batch_size(cfg: Config, train_features: int) -> int:
    """train.batch_size, or for auto 16 on small data and 32 beyond. Measured on 1,000 Rotten Tomatoes
    reviews (3 seeds): macro F1 0.776 at 16 against 0.765 at 32 for the same 300 steps, in 58% of the time."""
    if cfg.train.batch_size != "auto":
        return int(cfg.train.batch_size)
    return AUTO_SMALL_BATCH if train_features < AUTO_SMALL_DATA else AUTO_BATCH


def auto_steps(steps_per_epoch: int, min_steps: int = AUTO_MIN_STEPS) -> int:
    """epochs: auto in steps: at least min_steps (the task's), AUTO_LARGE_DATA_EPOCHS passes where that gives
    more, at most AUTO_MAX_EPOCHS passes."""
    return min(max(min_steps, math.ceil(AUTO_LARGE_DATA_EPOCHS * steps_per_epoch)), AUTO_MAX_EPOCHS * steps_per_epoch)


def _eval_every(setting, auto: bool, total: int, validation_examples: int, batch_size: int) -> int | None:
    if setting is None or (setting == "auto" and not auto):
        return None  # every epoch
    if setting != "auto":
        return int(setting)
    # as many evaluations as cost about EVAL_TIME_SHARE of the training, within [MIN, MAX]:
    # n x validation x cost per example <= share x trained examples
    trained = total * batch_size
    affordable = EVAL_TIME_SHARE * trained / max(1.0, validation_examples * EVAL_COST_PER_EXAMPLE)
    evals = max(AUTO_MIN_EVALS, min(AUTO_MAX_EVALS, int(affordable)))
    return max(1, math.ceil(total / evals))


def lr_factor(plan: TrainingPlan, kind: str):
    """The schedule as a function of the step, reading plan.total_steps at every call (a time budget
    may shorten the plan): linear or cosine decay to 0 after warm-up, or constant after warm-up."""
    def factor(step: int) -> float:
        warmup = plan.warmup_steps
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, plan.total_steps - warmup)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
        return max(0.0, 1.0 - progress)
    return factor


@dataclass
class Budget:
    """train.time_limit: seconds for the whole run, across resumes."""
    limit: float
    spent_before: float   # seconds used by earlier sessions of this run (resume)

    def steps_that_fit(self, elapsed: float, seconds_per_step: float, reserve: float) -> int:
        """Optimizer steps that still fit: what is left less the final reserve (last evaluation, test
        split, saving), at the measured seconds per step (its share of evaluations included)."""
        left = self.limit - self.spent_before - elapsed - reserve
        return max(0, int(left / max(seconds_per_step, 1e-9)))

    def over(self, elapsed: float, reserve: float) -> bool:
        return self.spent_before + elapsed + reserve >= self.limit


def describe_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m" if seconds >= 120 else f"{seconds:.0f}s"
