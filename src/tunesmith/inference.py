"""Running a model over examples, saving it, and the evaluate / predict entry points."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError

from . import distributed, inputs
from .atomic import recover_dir, replace_dir, temp_dir_beside, temp_file_beside, write_failed
from .config import Config, config_to_yaml, load_config
from .errors import TunesmithError
from .models import resolve_model, weights_options
from .strategies import load_adapter, save_weights
from .tasks import TASKS

_ENCODING = threading.Lock()
RUN_INFO = "tunesmith.json"  # written into model/: what predict needs to read data like training did


def _cpu_has_fast_bf16(needs_amx: bool = False) -> bool:
    """Whether this CPU runs bf16 fast: AMX, or AVX512-BF16 unless `needs_amx`. TUNESMITH_CPU_BF16=1 or 0
    overrides the answer: the test suite runs both ways on one machine, so no test depends on its CPU."""
    forced = os.environ.get("TUNESMITH_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    flags = _cpu_flags()
    return "amx_bf16" in flags or ("avx512_bf16" in flags and not needs_amx)


@lru_cache(maxsize=1)
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# Below this size a GPU step is bound by kernel launches, not arithmetic: measured on an H200
# (bench/README.md), MiniLM-L6 (22.7M) trained faster in fp32 than under bf16 autocast (whose casts are
# extra kernels), and a BERT-base-sized model (110M) took the same time per step either way.
GPU_BF16_MIN_PARAMETERS = 150_000_000


def choose_precision(setting: str, device: torch.device | None = None, parameters: int | None = None,
                     cpu_needs_amx: bool = False) -> str:
    """'auto' -> bf16 where the hardware runs it fast (CPUs with AMX/AVX512-BF16, or only AMX when
    `cpu_needs_amx`; GPUs with bf16, for models of GPU_BF16_MIN_PARAMETERS or more when the size is
    given), else fp32."""
    if setting != "auto":
        return setting
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        big_enough = parameters is None or parameters >= GPU_BF16_MIN_PARAMETERS
        return "bf16" if torch.cuda.is_bf16_supported() and big_enough else "fp32"
    return "bf16" if _cpu_has_fast_bf16(cpu_needs_amx) else "fp32"


def pad_multiple(setting: int | str, device: torch.device) -> int:
    """train.pad_to_multiple_of resolved for a device. On a GPU, bf16 steps measured many times slower
    when every batch brings a new width (bench/precision_step.py); a multiple of 16 keeps the widths
    to max_length / 16 shapes. On a CPU each padded token is computed, so batches stay tight."""
    if setting != "auto":
        return int(setting)
    return 16 if device.type == "cuda" else 1


# What one more model call costs on a CPU, in padded tokens of work (the Python and dispatch overhead of a
# forward pass). A batch of 32 random Rotten Tomatoes reviews holds 855 tokens padded to 1,696; cut into
# sub-batches of similar length they cost far less: bench/README.md "Serving under load".
CPU_CALL_TOKENS = 32


def length_batches(sorted_lengths: np.ndarray, batch_size: int, per_call: int | None) -> list[tuple[int, int]]:
    """Contiguous (start, end) batches of inputs sorted by length, at most batch_size each. On a CPU every
    padded position is computed, so the cut points minimise padded tokens + per_call for each batch (exact,
    by dynamic programming); per_call None (a GPU, where padding is nearly free and calls are dear): plain
    batches of batch_size."""
    n = len(sorted_lengths)
    if per_call is None or n <= 1:
        return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    widths = np.asarray(sorted_lengths, dtype=np.int64)
    best = np.zeros(n + 1, dtype=np.int64)   # best[j]: cheapest cost of the first j inputs
    cut = np.zeros(n + 1, dtype=np.int64)    # where the last batch of that cheapest plan starts
    for j in range(1, n + 1):
        starts = np.arange(max(0, j - batch_size), j)
        costs = best[starts] + (j - starts) * widths[j - 1] + per_call
        k = int(np.argmin(costs))
        best[j], cut[j] = costs[k], starts[k]
    batches, j = [], n
    while j > 0:
        batches.append((int(cut[j]), j))
        j = int(cut[j])
    return batches[::-1]


@torch.inference_mode()
def predict_outputs(model: torch.nn.Module | None, task, features: list[dict], lengths: list[int],
                    collate: Callable[[list[dict]], dict], batch_size: int, device: torch.device,
                    precision: str, with_loss: bool = False,
                    forward: Callable[[dict], torch.Tensor] | None = None, spread: bool = False) -> tuple[list, float | None]:
    """The model's output for every input, in input order (what one output is, the task says: a row of
    logits, or a (words, tags) array). Batches are formed by length so padding is minimal. `forward`
    (a batch -> logits) replaces the PyTorch model, e.g. an ONNX Runtime session (export.py).

    spread: the processes of a several-process launch share the batches (batch k is process k mod n's) and
    every process gets all the outputs back: each input once, unpadded, whatever the batch sizes. A sharded
    (FSDP) model gathers its weights from every process in each forward: all processes then run the same
    number of batches, the ones short of a batch running the first one again, its outputs dropped."""
    order = np.argsort(lengths, kind="stable")
    outputs: list = [None] * len(features)
    loss_sum = 0.0
    per_call = CPU_CALL_TOKENS if device.type == "cpu" else None
    batches = everyone = length_batches(np.asarray(lengths)[order], batch_size, per_call)
    n = distributed.processes() if spread else 1
    if n > 1:
        batches = batches[distributed.rank()::n]
    rounds = len(batches)
    if n > 1 and model is not None and _sharded(model):
        rounds = -(-len(everyone) // n)  # ceil: process 0's number of batches
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        for turn in range(rounds):
            if turn >= len(batches):  # FSDP: a forward every process must take part in; its outputs are not kept
                start, end = everyone[0]
                task.forward(model, {key: v.to(device) for key, v in collate(
                    [features[i] for i in order[start:end]]).items() if key != "labels"})
                continue
            start, end = batches[turn]
            idx = order[start:end]
            batch = collate([features[i] for i in idx])
            if not with_loss:
                batch.pop("labels", None)
            if forward is not None:
                logits, loss = forward(batch), None
            else:
                logits, loss = task.forward(model, {k: v.to(device) for k, v in batch.items()})
            if with_loss:
                loss_sum += loss.float().item() * len(idx)
            for i, out in zip(idx, task.split_outputs(logits.float().cpu().numpy(), [features[i] for i in idx])):
                outputs[i] = out
    if n > 1:
        mine = {int(i): outputs[i] for start, end in batches for i in order[start:end]}
        parts, loss_sum = distributed.gather((mine, loss_sum)), 0.0
        for theirs, their_loss in parts:
            for i, out in theirs.items():
                outputs[i] = out
            loss_sum += their_loss
    return outputs, (loss_sum / max(1, len(order)) if with_loss else None)


def _sharded(model: torch.nn.Module) -> bool:
    from .fsdp import is_sharded
    return is_sharded(model)


def example_outputs(model: torch.nn.Module | None, task, enc, collate: Callable[[list[dict]], dict], batch_size: int,
                    device: torch.device, precision: str, aggregation: str = "mean",
                    with_loss: bool = False, forward: Callable[[dict], torch.Tensor] | None = None,
                    spread: bool = False) -> tuple[Any, float | None]:
    """predict_outputs per example: a chunked document's windows are combined into one prediction,
    so metrics count documents, not windows (the loss is the mean over windows)."""
    outputs, loss = predict_outputs(model, task, enc.features, enc.lengths, collate, batch_size, device, precision,
                                    with_loss, forward=forward, spread=spread)
    outputs = task.merge_windows(outputs, enc, aggregation)
    if enc.generate is not None:  # a task that writes text: its generations join the outputs
        outputs = enc.generate(model, outputs, batch_size, device, precision)
    return outputs, loss


def save_model_dir(target: Path, model: torch.nn.Module, processor, cfg: Config, labels, task,
                   state_dict: dict | None = None) -> None:
    """The model's own folder format (a plain Hugging Face or timm folder, safetensors), its processor
    (tokenizer, image settings), tunesmith.json and the config, swapped in atomically. state_dict: the
    whole weights of a sharded (FSDP) model, gathered (fsdp.full_state)."""
    tmp = temp_dir_beside(target)
    try:
        save_weights(model, tmp, cfg, state_dict)
        task.save_processor(processor, tmp)
        info = {"task": cfg.task, "labels": asdict(labels)}
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=1))
        (tmp / "tunesmith_config.yaml").write_text(config_to_yaml(cfg))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_model_dir(model_dir: Path, task, labels, cfg: Config) -> tuple[torch.nn.Module, Any]:
    """(model, processor) saved in model/: a plain folder, or a LoRA adapter (+ head) on its base."""
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        # a Hugging Face adapter names its base; other models' adapters do not: the run's own model then
        base_source = json.loads(adapter.read_text()).get("base_model_name_or_path") or resolve_model(cfg.model.name)
        if Path(base_source).is_absolute() and not Path(base_source).is_dir():
            raise TunesmithError(f"{model_dir}: the adapter's base model {base_source} is not there any more "
                                 "(train with strategy.lora.save: merged for a self-contained folder)")
        base, processor = task.build_model(base_source, labels, cfg)
        return load_adapter(model_dir, base), processor
    return task.load_model(model_dir, cfg)


def write_frame_atomic(df: pd.DataFrame, path: Path) -> None:
    """A table written under a temporary name, then renamed; a failed write (full disk, read-only place)
    is one error line and leaves nothing behind."""
    try:
        tmp = temp_file_beside(path)
    except OSError as exc:
        raise write_failed(path, exc) from None
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df.to_parquet(tmp, index=False)
        elif path.suffix.lower() in (".jsonl", ".json"):
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            df.to_csv(tmp, index=False, sep="\t" if path.suffix.lower() == ".tsv" else ",")
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failed(path, exc) from None
        raise


class LoadedRun:
    """A trained model read back from a run folder (or from its model/ folder)."""

    def __init__(self, run: str | Path, precision: str = "auto", overrides: dict[str, Any] | None = None):
        path = Path(run)
        model_dir = path / "model" if (path / "model").is_dir() or (path / "model.old").is_dir() else path
        recover_dir(model_dir)
        info_path = model_dir / RUN_INFO
        if not info_path.is_file():
            raise TunesmithError(f"{run}: not a tunesmith run folder (no model/{RUN_INFO})")
        info = json.loads(info_path.read_text())
        self.task = TASKS[info["task"]]
        self.labels = self.task.labels_from_dict(info["labels"])
        self.cfg = load_config(model_dir / "tunesmith_config.yaml", overrides, saved=True)  # e.g. generation settings
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        weights_options(str(model_dir), self.cfg.model.allow_pickle)  # pickled weights only: refused, as train does
        try:
            self.model, self.processor = load_model_dir(model_dir, self.task, self.labels, self.cfg)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # e.g. weights cut short by a full disk
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TunesmithError(f"{model_dir}: the model cannot be loaded ({first}); its files may be damaged or "
                                 "incomplete: train again (or --resume the run if it kept its checkpoints)") from None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.precision = choose_precision(precision, self.device, sum(p.numel() for p in self.model.parameters()))

    def logits(self, examples, batch_size: int = 128, quiet: bool = False, pad_to: int | None = None):
        """One output per example (quiet: no note on stderr about long inputs, e.g. inside a server; pad_to:
        round each batch's width up to a multiple of this, instead of train.pad_to_multiple_of)."""
        return run_logits(self, examples, batch_size, quiet, pad_to=pad_to)


def run_logits(run, examples, batch_size: int, quiet: bool = False, forward: Callable | None = None,
               pad_to: int | None = None):
    """A loaded run's outputs for examples: encode, batch by length, run the model (or `forward`), merge windows."""
    # serve's workers encode from several threads: a fast tokenizer whose truncation / padding settings change
    # while another thread uses it fails with "Already borrowed" (huggingface/tokenizers#537), so one at a time
    with _ENCODING:
        enc = run.task.encode(run.processor, examples, run.cfg)
    if enc.truncated and not quiet:
        print(f"tunesmith: {run.task.describe_inputs(enc, run.cfg)}", file=sys.stderr)
    multiple = pad_to or pad_multiple(run.cfg.train.pad_to_multiple_of, run.device)
    collate = run.task.make_collate(run.processor, multiple)
    outputs, _ = example_outputs(getattr(run, "model", None), run.task, enc, collate, batch_size, run.device,
                                 run.precision, run.cfg.model.chunk_aggregation, forward=forward)
    return outputs


CV_INFO = "cv.json"  # the summary of a cross-validation folder (cv.py writes it)


def ensemble_logits(outputs: list, problem_type: str):
    """Average the fold models' probabilities, returned as logits that give back those probabilities.

    Softmax of log(p) is p again (p sums to 1), and sigmoid(log(p / (1 - p))) is p: so the tasks'
    predictions_frame and metrics read the ensemble exactly as they read one model.
    """
    if isinstance(outputs[0], list):  # token classification: one (positions, tags) array per example
        return [ensemble_logits([o[i] for o in outputs], problem_type) for i in range(len(outputs[0]))]
    stacked = np.stack(outputs).astype(np.float64)
    if problem_type == "regression":
        return stacked.mean(axis=0).astype(np.float32)
    if problem_type == "multi_label":
        p = np.clip((1 / (1 + np.exp(-stacked))).mean(axis=0), 1e-7, 1 - 1e-7)
        return np.log(p / (1 - p)).astype(np.float32)
    shifted = np.exp(stacked - stacked.max(axis=-1, keepdims=True))
    p = (shifted / shifted.sum(axis=-1, keepdims=True)).mean(axis=0)
    return np.log(np.clip(p, 1e-12, None)).astype(np.float32)


class CVEnsemble:
    """The fold models of a cv folder (cv.keep_models), predicting together like one LoadedRun."""

    def __init__(self, cv_dir: str | Path, precision: str = "auto", fold_dirs: list[Path] | None = None):
        cv_dir = Path(cv_dir)
        if fold_dirs is None:
            info = json.loads((cv_dir / CV_INFO).read_text())
            fold_dirs = [cv_dir / f"fold-{i}" for i in range(1, info["folds_run"] + 1)]
        missing = [d.name for d in fold_dirs if not (d / "model").is_dir()]
        if missing:
            raise TunesmithError(f"{cv_dir}: cross-validation folder without fold models ({', '.join(missing)}); "
                                 "run tunesmith cv with --keep-models to predict with the fold ensemble")
        self.members = [LoadedRun(d, precision) for d in fold_dirs]
        first = self.members[0]
        self.task, self.labels, self.cfg = first.task, first.labels, first.cfg

    def logits(self, examples, batch_size: int = 128, quiet: bool = False, pad_to: int | None = None):
        return ensemble_logits([m.logits(examples, batch_size, quiet, pad_to) for m in self.members],
                               self.labels.problem_type)


def is_cv_dir(path: str | Path) -> bool:
    return (Path(path) / CV_INFO).is_file()


def load_run(run: str | Path, precision: str = "auto", backend: str = "torch",
             overrides: dict[str, Any] | None = None):
    """A run folder, or a cross-validation folder whose fold models predict as one ensemble; with backend
    'onnx', the run's ONNX export (tunesmith export) run by ONNX Runtime."""
    if backend == "onnx":
        if is_cv_dir(run):
            raise TunesmithError(f"{run}: a cross-validation ensemble has no ONNX export; export a run folder")
        from .export import OnnxRun
        return OnnxRun(run)
    if backend != "torch":
        raise TunesmithError(f"backend '{backend}': use torch or onnx")
    return CVEnsemble(run, precision) if is_cv_dir(run) else LoadedRun(run, precision, overrides)


def check_batch_size(batch_size: Any) -> None:
    """The batch size an API call was given, refused in one line when it is not a whole number of 1 or more
    (0 failed deep in batching with a ValueError)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TunesmithError(f"batch_size: give a whole number, 1 or more (got {batch_size!r})")


def evaluate(run: str | Path, data, precision: str = "auto", batch_size: int = 128, backend: str = "torch") -> dict:
    """Metrics of a trained model on labelled data: a file, a DataFrame, a list of dicts or a Dataset."""
    check_batch_size(batch_size)
    loaded = load_run(run, precision, backend)
    with inputs.in_memory_input(data, "data", loaded.cfg.data.text_column) as source:
        examples = loaded.task.read_examples(source, loaded.cfg, loaded.labels, require_labels=True)
    return loaded.task.compute_metrics(loaded.logits(examples, batch_size), examples.targets, loaded.labels)


def predict(run: str | Path, input=None, output: str | Path | None = None,
            precision: str = "auto", batch_size: int = 128, texts: list[str] | None = None,
            backend: str = "torch", overrides: dict[str, Any] | None = None) -> pd.DataFrame:
    """Predictions for every row of `input` (a file, a DataFrame, a list of dicts or texts, or a Dataset;
    labels are optional there), or for raw `texts`: label and per-class probabilities; for token
    classification, tags and entities; for causal_lm, the generated text. backend 'onnx' runs the run's
    ONNX export with ONNX Runtime instead of PyTorch. `overrides` change the run's saved config for this
    call (causal_lm.max_new_tokens, temperature, top_p). Returns a DataFrame, also written to `output`
    when given."""
    if (input is None) == (texts is None):
        raise TunesmithError("predict needs an input (a file, a DataFrame, a list) or texts (one of them)")
    check_batch_size(batch_size)
    loaded = load_run(run, precision, backend, overrides)
    name = "input" if texts is None else "texts"
    if isinstance(texts, str):
        texts = [texts]
    source = list(texts) if texts is not None else input
    if inputs.is_text_list(source):  # texts or image paths: the task reads a plain list its own way
        examples = loaded.task.read_examples(source, loaded.cfg, loaded.labels, require_labels=False)
    else:
        with inputs.in_memory_input(source, name, loaded.cfg.data.text_column) as token:
            examples = loaded.task.read_examples(token, loaded.cfg, loaded.labels, require_labels=False)
    frame = loaded.task.predictions_frame(examples, loaded.logits(examples, batch_size), loaded.labels)
    if output is not None:
        write_frame_atomic(frame, Path(output))
    return frame
