"""Knowledge distillation (the `distill:` section): a student learns from a teacher's soft targets.

loss = alpha * T^2 * KL(p_teacher || p_student, both at temperature T) + (1 - alpha) * the hard-label loss.
The T^2 keeps the soft term's gradients at the hard term's scale whatever T is (Hinton et al. 2015).

The teacher's outputs are computed once, before training: one forward pass over the training inputs
(and data.unlabeled), kept in memory per input and reused every epoch. Text inputs are keyed by their token
ids, so they are also kept on disk ($TUNESMITH_CACHE/teacher_outputs, one file per teacher and input set) for
a resumed run or the next run with the same teacher and inputs; with text augmentation, only the inputs an
epoch's augmentation changed go through the teacher again. The teacher reads the examples with its own tokenizer: for token
classification the two sides meet at the words (both read the same words; each word's soft target sits
on the student's first sub-token of that word), so different tokenizers line up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import catalog, inputs
from .atomic import temp_file_beside
from .config import Config
from .errors import TunesmithError, not_found
from .inference import RUN_INFO, LoadedRun, choose_precision, pad_multiple, predict_outputs
from .layouts import find_layout
from .models import count_parameters, weights_options
from .runlog import count, warn
from .tasks.base import IGNORE, Encoded


@dataclass
class Teacher:
    source: str                     # distill.teacher as given
    task: Any
    model: torch.nn.Module
    processor: Any                  # the teacher's own tokenizer / image settings
    cfg: Config                     # how the teacher reads inputs (its max_length...), with this run's augmentation
    columns: list[int]              # the teacher's output column of each of the student's classes
    precision: str
    device: torch.device
    weights_digest: str             # names the teacher in the disk cache
    unlabeled: Any = None           # data.unlabeled examples (no targets)
    targets: list = field(default_factory=list)   # soft-target logits per training input of the current epoch
    memo: dict = field(default_factory=dict)       # teacher output per input (key: its token ids) for this run
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the student's blocks

def keep_blocks(model: torch.nn.Module, n: int, name: str) -> list[int]:
    """Keep n of the model's transformer blocks, evenly spread with the first and the last included
    (6 -> 3 keeps 0, 2, 5); returns the kept block numbers. The saved model has n blocks and loads in
    plain transformers (config.num_hidden_layers = n)."""
    layout = find_layout(model)
    if layout is None or not layout.is_huggingface:
        raise TunesmithError(f"distill.student_layers: works on Hugging Face transformer blocks; the blocks of "
                             f"{name} cannot be dropped")
    total = layout.num_blocks
    if n > total:
        raise TunesmithError(f"distill.student_layers: {n} blocks asked, {name} has {total}")
    keep = sorted({int(round(x)) for x in np.linspace(0, total - 1, n)})
    list_path = layout.blocks[0][0].rpartition(".")[0]
    blocks = model.get_submodule(list_path)
    layout.swap(list_path, torch.nn.ModuleList([blocks[i] for i in keep]))
    model.config.num_hidden_layers = len(keep)
    return keep


# ---------------------------------------------------------------- loading and checking the teacher

def load_teacher(cfg: Config, task, labels) -> Teacher:
    """The teacher model, checked: same task, same label names (in any order), weights loaded safely."""
    source = cfg.distill.teacher
    path = Path(source)
    if not path.exists():
        raise not_found(path, "distill.teacher folder")
    model_dir = path / "model" if (path / "model").is_dir() else path
    where = f"distill.teacher {source}"
    if (model_dir / RUN_INFO).is_file():  # a tunesmith run: its own task, labels and reading settings
        run = LoadedRun(model_dir, precision="fp32")
        if run.task is not task:
            raise TunesmithError(f"{where}: a {run.task.NAME} model; this run is {task.NAME}")
        model, processor, names, teacher_cfg = run.model, run.processor, list(run.labels.names), run.cfg
    elif (model_dir / "config.json").is_file():  # a plain Hugging Face folder with its id2label
        weights_options(str(model_dir), cfg.model.allow_pickle)
        try:
            model, processor = task.load_model(model_dir, cfg)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TunesmithError(f"{where}: cannot be loaded as a {task.NAME} model ({first})") from None
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        names = [str(id2label[i]) for i in sorted(id2label)]
        teacher_cfg = cfg
    else:
        raise TunesmithError(f"{where}: neither a tunesmith run folder nor a model folder (no config.json)")
    if sorted(names) != sorted(labels.names):
        raise TunesmithError(f"{where}: its labels ({_shown(names)}) are not the training data's "
                             f"({_shown(labels.names)}); the teacher must predict the same label names")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    precision = choose_precision(cfg.train.precision, device, count_parameters(model)[1], task.cpu_bf16_needs_amx())
    # the teacher reads as it was trained to (its max_length...), and augments as this run does
    teacher_cfg = teacher_cfg.model_copy(update={"augment": cfg.augment, "train": teacher_cfg.train.model_copy(
        update={"seed": cfg.train.seed})})
    return Teacher(source, task, model, processor, teacher_cfg, [names.index(n) for n in labels.names], precision,
                   device, _weights_digest(model_dir))


def _shown(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)})" if len(names) > limit else "")


def _weights_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- teacher outputs, computed once

def _input_key(feature: dict) -> str | None:
    """What the teacher's output for one input depends on (its ids), as a key; None when the input is not
    plain data (an image store), so it is kept for this run only, by position."""
    try:
        return json.dumps({k: v for k, v in feature.items() if k != "labels"}, sort_keys=True, default=_plain)
    except TypeError:
        return None


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def teacher_outputs(teacher: Teacher, examples, train: bool = False, epoch: int = 0) -> tuple[Any, Encoded]:
    """The teacher's per-example outputs (columns in the student's class order) and its encoding of the
    examples; only inputs it has not seen in this run (or in the disk cache) go through it."""
    enc = teacher.task.encode(teacher.processor, examples, teacher.cfg, train=train, epoch=epoch)
    keys = [_input_key(f) for f in enc.features]
    plain = all(k is not None for k in keys)
    if not plain:  # images: by position within this run
        keys = [f"{id(examples)}:{train}:{epoch}:{i}" for i in range(len(enc.features))]
    if plain and not train:
        _read_disk_cache(teacher, keys)
    todo = [i for i, k in enumerate(keys) if k not in teacher.memo]
    if todo:
        started = time.perf_counter()
        collate = teacher.task.make_collate(teacher.processor, pad_multiple(teacher.cfg.train.pad_to_multiple_of,
                                                                              teacher.device))
        outputs, _ = predict_outputs(teacher.model, teacher.task, [enc.features[i] for i in todo],
                                     [enc.lengths[i] for i in todo], collate, teacher.cfg.train.eval_batch_size,
                                     teacher.device, teacher.precision)
        for i, out in zip(todo, outputs):
            teacher.memo[keys[i]] = np.asarray(out, dtype=np.float32)[..., teacher.columns]
        seconds = time.perf_counter() - started
        teacher.summary["forward_seconds"] = round(teacher.summary.get("forward_seconds", 0.0) + seconds, 2)
        teacher.summary["forward_inputs"] = teacher.summary.get("forward_inputs", 0) + len(todo)
        if plain and not train:
            _write_disk_cache(teacher, keys)
    per_input = [teacher.memo[k] for k in keys]
    return teacher.task.merge_windows(per_input, enc, teacher.cfg.model.chunk_aggregation), enc


def _cache_file(teacher: Teacher, keys: list[str]) -> Path:
    digest = hashlib.sha256(f"{teacher.weights_digest}\n{teacher.precision}\n{teacher.columns}\n".encode())
    for k in keys:
        digest.update(k.encode())
        digest.update(b"\n")
    return catalog.cache_dir() / "teacher_outputs" / f"{digest.hexdigest()[:32]}.npz"


def _read_disk_cache(teacher: Teacher, keys: list[str]) -> None:
    """Outputs kept by an earlier run (or before a resume) of this teacher on exactly these inputs."""
    file = _cache_file(teacher, keys)
    if not file.is_file():
        return
    try:
        with np.load(file) as saved:
            flat, offsets, shapes = saved["flat"], saved["offsets"], saved["shapes"]
    except (OSError, ValueError, KeyError):
        warn(f"{file}: teacher output cache unreadable; computing the outputs again")
        return
    for i, k in enumerate(keys):
        teacher.memo[k] = flat[offsets[i]:offsets[i + 1]].reshape(shapes[i])
    teacher.summary["cache_file"] = str(file)
    teacher.summary["read_from_cache"] = teacher.summary.get("read_from_cache", 0) + len(keys)


def _write_disk_cache(teacher: Teacher, keys: list[str]) -> None:
    """One file per input set (written whole under a temporary name, then renamed); a failed write only
    costs the next run a teacher pass."""
    file = _cache_file(teacher, keys)
    rows = [teacher.memo[k] for k in keys]
    offsets = np.cumsum([0] + [r.size for r in rows])
    width = max((r.ndim for r in rows), default=1)
    shapes = np.asarray([(r.shape if r.ndim == width else (0,) * width) for r in rows], dtype=np.int64)
    try:
        tmp = temp_file_beside(file)
        with open(tmp, "wb") as f:
            np.savez(f, flat=np.concatenate([r.reshape(-1) for r in rows]) if rows else np.zeros(0, np.float32),
                     offsets=offsets, shapes=shapes)
        tmp.replace(file)
        teacher.summary["cache_file"] = str(file)
    except OSError as exc:
        warn(f"{file}: cannot keep the teacher's outputs on disk ({exc.strerror or exc})")


# ---------------------------------------------------------------- training inputs and their soft targets

def prepare(teacher: Teacher, task, processor, splits, train_enc: Encoded, cfg: Config, labels) -> Encoded:
    """The training inputs (data.unlabeled appended, with no labels) and each one's soft targets."""
    if cfg.data.unlabeled is not None:
        unlabeled = task.read_examples(cfg.data.unlabeled, cfg, labels, require_labels=False)
        if len(unlabeled) == 0:
            raise TunesmithError(f"data.unlabeled {inputs.shown(cfg.data.unlabeled)}: no examples")
        teacher.unlabeled = dataclasses.replace(unlabeled, targets=None)  # a label column there is not used
    started = time.perf_counter()
    # with augmentation, train_enc is epoch 0's augmented copy: the targets match it
    enc = epoch_inputs(teacher, task, processor, splits.train, train_enc, cfg, epoch=0 if cfg.augment else None)
    teacher.summary["prepare_seconds"] = round(time.perf_counter() - started, 2)
    _check_words(teacher, task, splits.train, train_enc)
    return enc


def epoch_inputs(teacher: Teacher, task, processor, train_examples, train_enc: Encoded, cfg: Config,
                 epoch: int | None) -> Encoded:
    """train_enc plus data.unlabeled (encoded for this epoch), and teacher.targets for every input.
    epoch None: the un-augmented inputs (setup); a number: that epoch's augmented copy."""
    augmenting = epoch is not None
    outputs, _ = teacher_outputs(teacher, train_examples, augmenting, epoch or 0)
    targets = task.window_targets(outputs, train_enc)
    if teacher.unlabeled is not None:
        un_enc = task.encode(processor, teacher.unlabeled, cfg, train=True, epoch=epoch or 0)
        un_outputs, _ = teacher_outputs(teacher, teacher.unlabeled, augmenting, epoch or 0)
        targets += task.window_targets(un_outputs, un_enc)
        train_enc = _joined(train_enc, un_enc)
    teacher.targets = targets
    return train_enc


def _joined(enc: Encoded, extra: Encoded) -> Encoded:
    """Labelled inputs then unlabelled ones, whose labels are all IGNORE (no hard loss)."""
    like = enc.features[0].get("labels") if enc.features else None
    features = []
    for f in extra.features:
        ignore = [IGNORE] * len(f["input_ids"]) if isinstance(like, list) else np.int64(IGNORE)
        features.append({**f, "labels": ignore})
    doc_index = None
    if enc.doc_index is not None or extra.doc_index is not None:
        own = enc.doc_index if enc.doc_index is not None else list(range(len(enc.features)))
        theirs = extra.doc_index if extra.doc_index is not None else list(range(len(extra.features)))
        doc_index = list(own) + [enc.num_examples + d for d in theirs]
    return dataclasses.replace(enc, features=enc.features + features, lengths=enc.lengths + extra.lengths,
                               truncated=enc.truncated + extra.truncated, doc_index=doc_index,
                               num_examples=enc.num_examples + extra.num_examples)


def _check_words(teacher: Teacher, task, examples, student_enc: Encoded) -> None:
    """Token classification: every word the student learns should have the teacher's output; words past
    the teacher's max_length have none (they learn from their labels only), said once."""
    per_word = [t for t in teacher.targets if np.ndim(t) == 2]
    if not per_word:  # one row per input: nothing to line up
        return
    missing = sum(int(np.isnan(t).any(axis=-1).sum()) for t in per_word)
    teacher.summary["words_without_soft_target"] = missing
    if missing:
        warn(f"distill: {missing} word(s) lie past the teacher's max_length ({teacher.cfg.model.max_length} "
             "tokens): they learn from their labels only (raise model.max_length in the teacher's config)")


# ---------------------------------------------------------------- the loss

def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher / T) || softmax(student / T)); rows with NaN targets skipped."""
    keep = ~torch.isnan(teacher).any(dim=-1)
    if not keep.any():
        return student.sum() * 0.0
    s = F.log_softmax(student[keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[keep].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") / keep.sum() * temperature ** 2


def distill_loss(task, model: torch.nn.Module, batch: dict, features: list[dict], targets: list,
                 cfg: Config, loss_fn) -> torch.Tensor:
    """alpha * the soft-target term over every input + (1 - alpha) * the hard loss over labelled ones."""
    alpha, temperature = cfg.distill.alpha, cfg.distill.temperature
    labels = batch["labels"]
    logits, _ = task.forward(model, {k: v for k, v in batch.items() if k != "labels"})
    classes = logits.shape[-1]
    rows = task.split_outputs(logits, features)  # the outputs the teacher's targets stand for
    student = torch.cat([r.reshape(-1, classes) for r in rows])
    teacher = torch.as_tensor(np.concatenate([np.asarray(t).reshape(-1, classes) for t in targets]),
                              device=student.device)
    loss = alpha * soft_target_loss(student, teacher, temperature)
    labelled = (labels.reshape(len(labels), -1) != IGNORE).any(dim=1)
    if alpha < 1 and labelled.any():
        lg, y = logits[labelled], labels[labelled]
        hard = loss_fn(lg, y) if loss_fn is not None else \
            F.cross_entropy(lg.float().reshape(-1, classes), y.reshape(-1), ignore_index=IGNORE)
        loss = loss + (1 - alpha) * hard
    return loss


# ---------------------------------------------------------------- the summary

def describe(teacher: Teacher, cfg: Config, n_train_inputs: int) -> str:
    s = teacher.summary
    n_unlabeled = len(teacher.unlabeled) if teacher.unlabeled is not None else 0
    done = (f"{s['forward_inputs']} input(s) through the teacher in {s['forward_seconds']:.1f}s"
            if s.get("forward_inputs") else "no teacher pass needed")
    cached = f", {s['read_from_cache']} read from {s['cache_file']}" if s.get("read_from_cache") else ""
    return (f"distill: teacher {teacher.source} ({count(count_parameters(teacher.model)[1])} parameters), "
            f"temperature {cfg.distill.temperature:g}, alpha {cfg.distill.alpha:g}; {n_unlabeled} unlabeled "
            f"example(s); soft targets for {n_train_inputs} training input(s): {done}{cached}")


def summary(teacher: Teacher, cfg: Config) -> dict:
    return {"teacher": teacher.source, "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
            "student_layers": cfg.distill.student_layers,
            "unlabeled": len(teacher.unlabeled) if teacher.unlabeled is not None else 0,
            "teacher_parameters": count_parameters(teacher.model)[1], **teacher.summary}
