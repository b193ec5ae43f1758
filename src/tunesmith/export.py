"""ONNX export of a trained run (`tunesmith export`) and the ONNX Runtime backend of predict, evaluate and serve.

The export never names a task: it makes a batch the way inference does (the task's encode + collate),
traces the task's forward on it, and declares axis 0 of every tensor the batch and axis 1 of every 2-D
input (token ids, masks) and of a 3-D output (token logits) the sequence, so any batch size and length
runs. The folder it writes is self-contained for prediction: model.onnx, the processor (tokenizer or image
settings), tunesmith.json, the config, and export.json with the parity check against PyTorch.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import replace_dir, temp_dir_beside
from .config import load_config
from .errors import TunesmithError
from .evaluate import scalar_metrics
from .inference import RUN_INFO, LoadedRun, check_batch_size, is_cv_dir, run_logits
from .tasks import TASKS
from .tasks.base import exportable, resolve_data_config

ONNX_FILE = "model.onnx"
EXPORT_INFO = "export.json"
EXPORT_DIR = "onnx"  # the default output folder, inside the run folder


def export(run: str | Path, output: str | Path | None = None, quantize: str | None = None,
           data: Any = None, batch_size: int | None = None) -> dict:
    """Export a run's model to ONNX (int8-quantized with quantize='int8') into `output` (default RUN/onnx),
    check it against PyTorch on the test split (or `data`), and return the report saved as export.json."""
    if is_cv_dir(run):
        raise TunesmithError(f"{run}: a cross-validation folder holds several models; export one run folder")
    if batch_size is not None:
        check_batch_size(batch_size)
    started = time.perf_counter()
    loaded = LoadedRun(run, precision="fp32")
    task, cfg = loaded.task, loaded.cfg
    if not exportable(task):
        raise TunesmithError(f"task {task.NAME}: export to ONNX is not available for it yet")
    loaded.model.to("cpu")  # exported and compared on the CPU, in fp32
    loaded.device = torch.device("cpu")
    quantize = quantize if quantize is not None else cfg.export.quantize
    batch_size = batch_size if batch_size is not None else cfg.export.batch_size
    examples, source = _parity_examples(loaded, data)
    model_dir = Path(run) / "model" if (Path(run) / "model").is_dir() else Path(run)
    target = Path(output) if output is not None else model_dir.parent / EXPORT_DIR
    tmp = temp_dir_beside(target)
    try:
        names = _export_graph(loaded, examples, tmp / ONNX_FILE, cfg.export.opset)
        task.save_processor(loaded.processor, tmp)
        for name in (RUN_INFO, "tunesmith_config.yaml"):
            shutil.copyfile(model_dir / name, tmp / name)
        report = _parity(loaded, examples, tmp, batch_size, quantize, cfg.export.max_abs_diff)
        report.update(format="onnx", quantize=quantize, opset=cfg.export.opset, inputs=names, parity_data=source,
                      seconds=round(time.perf_counter() - started, 1))
        (tmp / EXPORT_INFO).write_text(json.dumps(report, indent=1))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["output"] = str(target)
    return report


def _parity_examples(loaded: LoadedRun, data: Any) -> tuple[Any, str]:
    """Labelled examples for the parity check: `data`, else the run's test split."""
    source = data if data is not None else resolve_data_config(loaded.cfg.data).test
    if source is None or source is False:  # data.test: false, or no test split at all
        raise TunesmithError("export: the run has no test split to check the export on; give --data FILE "
                             "(labelled, like the training data)")
    examples = loaded.task.read_examples(source, loaded.cfg, loaded.labels, require_labels=True)
    if len(examples) == 0:
        raise TunesmithError(f"{source}: no examples to check the export on")
    return examples, str(source)


class _Logits(torch.nn.Module):
    """The task's forward as a module of positional tensors (what the ONNX exporter traces)."""

    def __init__(self, model: torch.nn.Module, task, names: list[str]):
        super().__init__()
        self.model, self.task, self.names = model, task, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.task.forward(self.model, dict(zip(self.names, tensors)))[0]


def _export_graph(loaded: LoadedRun, examples, path: Path, opset: int) -> dict[str, list[str]]:
    """Trace the model on a batch of the shortest and the longest example; returns each input's axes."""
    enc = loaded.task.encode(loaded.processor, examples.subset(np.arange(min(len(examples), 256))), loaded.cfg)
    order = np.argsort(enc.lengths, kind="stable")
    batch = loaded.task.make_collate(loaded.processor, 1)([enc.features[order[0]], enc.features[order[-1]]])
    batch = {k: v.contiguous() for k, v in batch.items() if k not in ("labels", "soft_labels")}
    names = list(batch)
    with torch.no_grad():
        out = loaded.task.forward(loaded.model, batch)[0]
    axes = {n: {0: "batch", **({1: "sequence"} if t.dim() == 2 else {})} for n, t in batch.items()}
    axes["logits"] = {0: "batch", **({1: "sequence"} if out.dim() == 3 else {})}
    # The TorchScript exporter: the same outputs as the dynamo one here (max abs diff 1e-8 on a tiny BERT)
    # in a fifth of the time (2.6 s against 11-15 s); it leaves the model in training mode, hence eval().
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Logits(loaded.model, loaded.task, names), tuple(batch[n] for n in names), str(path),
                          input_names=names, output_names=["logits"], dynamic_axes=axes, opset_version=opset,
                          dynamo=False)
    loaded.model.eval()
    return {n: [axes[n].get(d, int(s)) for d, s in enumerate(t.shape)] for n, t in batch.items()}


def _parity(loaded: LoadedRun, examples, folder: Path, batch_size: int, quantize: str | None,
            limit: float) -> dict:
    """PyTorch against ONNX Runtime (and the int8 model) on the same examples: max abs difference of the
    outputs and the task's metrics of each; an fp32 export off by more than `limit` is refused."""
    def metrics(outputs) -> dict:
        return scalar_metrics(loaded.task.compute_metrics(outputs, examples.targets, loaded.labels))

    timer = time.perf_counter()
    reference = run_logits(loaded, examples, batch_size, quiet=True)
    report = {"examples": len(examples), "torch": {**metrics(reference), "seconds": _since(timer)}}
    timer = time.perf_counter()
    fp32 = OnnxRun(folder, loaded).logits(examples, batch_size, quiet=True)
    diff = _max_abs_diff(reference, fp32)
    report["onnx_fp32"] = {**metrics(fp32), "max_abs_diff": diff, "seconds": _since(timer)}
    if not diff <= limit:
        raise TunesmithError(f"export: the ONNX model's outputs differ from PyTorch's by up to {diff:.3g} "
                             f"(export.max_abs_diff: {limit:g}); nothing was written")
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        fp32_path = folder / "model.fp32.onnx"
        (folder / ONNX_FILE).rename(fp32_path)
        logging.disable(logging.WARNING)  # its advice to pre-process first, printed on every call
        try:
            quantize_dynamic(str(fp32_path), str(folder / ONNX_FILE), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        fp32_path.unlink()
        timer = time.perf_counter()
        int8 = OnnxRun(folder, loaded).logits(examples, batch_size, quiet=True)
        scores = metrics(int8)
        report["onnx_int8"] = {**scores, "max_abs_diff": _max_abs_diff(reference, int8), "seconds": _since(timer),
                               "change": {k: v - report["torch"][k] for k, v in scores.items()}}
    return report


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def _max_abs_diff(a: list, b: list) -> float:
    """Largest difference over every output value (rows of logits, or per-word arrays)."""
    return float(max((np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max(initial=0.0)
                      for x, y in zip(a, b)), default=0.0))


# ---------------------------------------------------------------- the ONNX Runtime backend

def find_export(run: str | Path) -> Path:
    """The export folder of a run: the folder itself (holding model.onnx) or RUN/onnx."""
    path = Path(run)
    for folder in (path, path / EXPORT_DIR):
        if (folder / ONNX_FILE).is_file():
            return folder
    if not path.exists():
        raise TunesmithError(f"{run}: folder not found")
    raise TunesmithError(f"{run}: no ONNX export ({EXPORT_DIR}/{ONNX_FILE}); make one with: tunesmith export {run}")


class OnnxRun:
    """An exported model run by ONNX Runtime; predicts like a LoadedRun (logits of examples)."""

    def __init__(self, run: str | Path, like: LoadedRun | None = None):
        import onnxruntime as ort
        folder = find_export(run)
        if like is not None:  # during export: the run's own task, labels, config and processor
            self.task, self.labels, self.cfg, self.processor = like.task, like.labels, like.cfg, like.processor
        else:
            info = json.loads((folder / RUN_INFO).read_text())
            self.task = TASKS[info["task"]]
            self.labels = self.task.labels_from_dict(info["labels"])
            self.cfg = load_config(folder / "tunesmith_config.yaml", saved=True)
            if not exportable(self.task):
                raise TunesmithError(f"task {self.task.NAME}: the ONNX backend is not available for it yet")
            self.processor = self.task.load_processor(folder, self.cfg)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # as many threads as PyTorch uses (OMP_NUM_THREADS): on a 2-core machine shared with other jobs, 2 spinning
        # threads per process made PyTorch 15x slower than 1 (bench/README.md); ONNX Runtime spins the same way
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a damaged file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TunesmithError(f"{folder / ONNX_FILE}: not a readable ONNX model ({first}); export again") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.folder, self.device, self.precision = folder, torch.device("cpu"), "fp32"

    def forward(self, batch: dict) -> torch.Tensor:
        missing = [n for n in self.input_names if n not in batch]
        if missing:
            raise TunesmithError(f"{self.folder}: the model takes {', '.join(missing)}, which these inputs lack "
                                 "(exported with a different data setup?)")
        feeds = {n: np.ascontiguousarray(batch[n].numpy()) for n in self.input_names}
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def logits(self, examples, batch_size: int = 128, quiet: bool = False, pad_to: int | None = None):
        return run_logits(self, examples, batch_size, quiet, forward=self.forward, pad_to=pad_to)


def format_report(report: dict) -> str:
    """The parity table printed by `tunesmith export`."""
    rows = [("torch (fp32)", report["torch"]), ("onnx fp32", report["onnx_fp32"])]
    if "onnx_int8" in report:
        rows.append(("onnx int8", report["onnx_int8"]))
    keys = [k for k in report["torch"] if k != "seconds"][:3]
    lines = [f"{'model':<14}" + "".join(f"{k:>16}" for k in keys) + f"{'max abs diff':>14}{'seconds':>9}"]
    for name, r in rows:
        diff = f"{r['max_abs_diff']:.2e}" if "max_abs_diff" in r else "-"
        lines.append(f"{name:<14}" + "".join(f"{r[k]:>16.4f}" for k in keys) + f"{diff:>14}{r['seconds']:>9.1f}")
    return "\n".join(lines)
