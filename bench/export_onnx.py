"""ONNX Runtime (fp32 and int8 exports) against PyTorch predict: samples/s and scores on the same test split.

    .venv/bin/python bench/export_onnx.py RUN [--rows N] [--passes 2] [--batch-size 128]

RUN is a trained run folder (e.g. MiniLM-L6 briefly trained on Rotten Tomatoes:
`tunesmith train configs/rotten_tomatoes.yaml --train.max_steps 150`). Missing exports are made first
(`tunesmith export RUN --output RUN/onnx` and `--quantize int8 --output RUN/onnx-int8`). Every side is loaded
once, then the sides predict the same test rows in alternating passes (one process, so they share the
machine's state); the table gives the median samples/s over passes (tokenizing, batching by length and the
model call included: what `tunesmith predict` does), the scores and the ratio to PyTorch as predict runs it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from tunesmith.evaluate import scalar_metrics
from tunesmith.export import EXPORT_DIR, export
from tunesmith.inference import LoadedRun, load_run
from tunesmith.tasks.base import resolve_data_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--rows", type=int, help="first N rows of the test split (default: all)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    run = Path(args.run)
    exports = {"onnx fp32": run / EXPORT_DIR, "onnx int8": run / f"{EXPORT_DIR}-int8"}
    for name, folder in exports.items():
        if not (folder / "model.onnx").is_file():
            print(f"exporting {name} into {folder} ...", flush=True)
            export(run, folder, quantize="int8" if "int8" in name else None)
    sides = {"torch (predict default)": LoadedRun(run, "auto"), "torch fp32": LoadedRun(run, "fp32")}
    sides["torch (predict default)"].label = f"torch {sides['torch (predict default)'].precision} (predict default)"
    for name, folder in exports.items():
        sides[name] = load_run(folder, backend="onnx")
    first = sides["torch fp32"]
    examples = first.task.read_examples(resolve_data_config(first.cfg.data).test, first.cfg, first.labels)
    if args.rows:
        examples = examples.subset(np.arange(min(args.rows, len(examples))))
    times: dict[str, list[float]] = {name: [] for name in sides}
    scores: dict[str, dict] = {}
    for p in range(args.passes):
        for name, side in sides.items():
            start = time.perf_counter()
            logits = side.logits(examples, args.batch_size, quiet=True)
            times[name].append(time.perf_counter() - start)
            scores[name] = scalar_metrics(side.task.compute_metrics(logits, examples.targets, side.labels))
            print(f"pass {p + 1}: {name}: {len(examples) / times[name][-1]:.1f} samples/s", flush=True)
    base = len(examples) / statistics.median(times["torch (predict default)"])
    print(f"\n{len(examples)} test rows of {run}, batch {args.batch_size}, median of {args.passes} passes\n")
    print("| side | samples/s | vs predict default | accuracy | macro F1 | accuracy change |")
    print("|---|---|---|---|---|---|")
    ref = scores["torch fp32"]["accuracy"]
    for name, side in sides.items():
        speed = len(examples) / statistics.median(times[name])
        s = scores[name]
        label = getattr(side, "label", name)
        print(f"| {label} | {speed:.1f} | {speed / base:.2f}x | {s['accuracy']:.4f} | {s['macro_f1']:.4f} | "
              f"{s['accuracy'] - ref:+.4f} |")


if __name__ == "__main__":
    main()
