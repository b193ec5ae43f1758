"""Knowledge distillation on Rotten Tomatoes: an MPNet-base teacher, MiniLM-L6 students.

    nice -n 5 .venv/bin/python bench/distill.py --work /tmp/distill_bench
    nice -n 5 .venv/bin/python bench/distill.py --work /tmp/distill_bench --rows teacher   # the slow part first

Rows (each a `tunesmith train` in its own process, one after the other; a row whose run folder already
has metrics.json is read, not trained again, so the teacher can be trained first and the rest later):
  teacher            mpnet-base (109M) fine-tuned by tunesmith on the training rows (train.time_limit)
  minilm             minilm-l6 (22.7M) trained alone on the same rows, defaults
  distill            minilm-l6 distilled from the teacher (labelled rows only)
  distill_unlabeled  the same plus the training split's other reviews (those not sampled as labelled rows)
                     as data.unlabeled: texts the teacher labels, written without their labels
  student3           minilm-l6 cut to 3 of its 6 blocks (distill.student_layers: 3), distilled, labelled rows
  student3_alone     the same 3-block student trained on the labels alone (no teacher)
  student3_unlabeled the 3-block student distilled with the unlabelled texts too

--teacher-model minilm-l6 makes a cheaper teacher (MiniLM-L6 fine-tuned: then the `minilm` row is the
teacher itself, and the 3-block rows measure distillation into a model half its depth).

Data, all from packages: the catalog's Rotten Tomatoes train split (films never in the test split), of
which --train-rows rows are sampled (seed 0; all of them with 0), and its test split (--test-rows sampled
rows, seed 0; all with 0). Every student uses the defaults (epochs, batch, lr auto) and seed 0; the
distilled ones temperature 2, alpha 0.5. Predict speed: every run's model/ loaded in this process, the test
texts scored in batches of 128 (tokenizing included), one pass per model per round, round-robin, the median
of 3 rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROWS = ("teacher", "minilm", "distill", "distill_unlabeled", "student3", "student3_alone", "student3_unlabeled")
DISTILL = {"temperature": 2.0, "alpha": 0.5}


def prepare(work: Path, train_rows: int, test_rows: int) -> dict:
    from tunesmith import catalog
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    rt = catalog.dataset_path("rotten_tomatoes")
    train, test = pd.read_csv(rt / "train.csv"), pd.read_csv(rt / "test.csv")
    if train_rows:
        train = train.sample(train_rows, random_state=0)
    if test_rows:
        test = test.sample(test_rows, random_state=0)
    train.to_csv(data / "train.csv", index=False)
    test.to_csv(data / "test.csv", index=False)
    # the unlabelled texts: the training split's other reviews (films never in the test split), their labels
    # dropped here; the students see them only through the teacher's soft targets
    rest = pd.read_csv(rt / "train.csv").drop(index=train.index) if train_rows else train.iloc[:0]
    rest[["text"]].to_csv(data / "unlabeled.csv", index=False)
    return {"train": data / "train.csv", "test": data / "test.csv", "unlabeled": data / "unlabeled.csv",
            "n_train": len(train), "n_test": len(test), "n_unlabeled": len(rest)}


def row_config(row: str, files: dict, work: Path, teacher_time: str | None, teacher_model: str,
               teacher_steps: int | None = None) -> dict:
    cfg = {"task": "text_classification", "model": {"name": "minilm-l6", "max_length": 128},
           "data": {"train": str(files["train"]), "test": str(files["test"]), "group_column": "film"},
           "train": {"seed": 0}, "output": {"dir": str(work / "runs"), "name": row}}
    teacher = str(work / "runs" / "teacher")
    if row == "teacher":
        cfg["model"]["name"] = teacher_model
        if teacher_time:
            cfg["train"]["time_limit"] = teacher_time
        if teacher_steps:
            cfg["train"]["max_steps"] = teacher_steps
        return cfg
    if row.startswith("student3"):
        cfg["distill"] = {"student_layers": 3}
    if row in ("distill", "distill_unlabeled", "student3", "student3_unlabeled"):
        cfg["distill"] = {**cfg.get("distill", {}), "teacher": teacher, **DISTILL}
    if row.endswith("_unlabeled"):
        cfg["data"]["unlabeled"] = str(files["unlabeled"])
    return cfg


def train_row(row: str, cfg: dict, work: Path) -> dict:
    run_dir = work / "runs" / row
    if not (run_dir / "metrics.json").is_file():
        config = work / f"{row}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        started = time.perf_counter()
        log = open(work / f"{row}.log", "w")
        proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config)], stdout=log,
                              stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"{row}: tunesmith train failed (exit {proc.returncode}); see {work / f'{row}.log'}")
        (run_dir / "bench_wall_seconds").write_text(f"{time.perf_counter() - started:.1f}")
    return json.loads((run_dir / "metrics.json").read_text())


def predict_speeds(run_dirs: dict[str, Path], test: Path, rounds: int = 3, rows: int = 0) -> dict[str, float]:
    """Test samples per second of each run's model/, passes taken round-robin (one pass of each model per
    round, so a change in the host's load hits every model alike), median of the rounds."""
    from tunesmith.inference import LoadedRun
    runs = {row: LoadedRun(d) for row, d in run_dirs.items()}
    examples = {row: r.task.read_examples(str(test), r.cfg, r.labels, require_labels=False) for row, r in runs.items()}
    if rows:  # the first `rows` test texts only (an MPNet pass over all of them takes minutes on 2 cores)
        examples = {row: ex.subset(np.arange(min(rows, len(ex)))) for row, ex in examples.items()}
    times: dict[str, list[float]] = {row: [] for row in runs}
    for _ in range(rounds):
        for row, run in runs.items():
            started = time.perf_counter()
            run.logits(examples[row])
            times[row].append(time.perf_counter() - started)
    return {row: len(examples[row]) / statistics.median(t) for row, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill_bench"))
    ap.add_argument("--train-rows", type=int, default=2000, help="training rows sampled (0: the whole split)")
    ap.add_argument("--test-rows", type=int, default=1000, help="test rows sampled (0: the whole split)")
    ap.add_argument("--teacher-model", default="mpnet-base", help="catalog name of the teacher's backbone")
    ap.add_argument("--teacher-time", default=None, help="the teacher's train.time_limit (default: none)")
    ap.add_argument("--teacher-steps", type=int, default=None, help="the teacher's train.max_steps (default: auto)")
    ap.add_argument("--speed-rows", type=int, default=0, help="test texts timed for predict speed (0: all)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = prepare(args.work, args.train_rows, args.test_rows)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; train {files['n_train']} rows, "
          f"test {files['n_test']}, unlabeled {files['n_unlabeled']}; started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    summaries = {}
    for row in args.rows:
        summaries[row] = train_row(row, row_config(row, files, args.work, args.teacher_time, args.teacher_model,
                                                   args.teacher_steps), args.work)
        print(f"  {row}: done ({time.strftime('%H:%M', time.gmtime())})", flush=True)
    speeds = predict_speeds({row: args.work / "runs" / row for row in args.rows}, files["test"],
                            rows=args.speed_rows)
    print_table({row: (summaries[row], speeds[row]) for row in args.rows}, args.teacher_model)


def print_table(results: dict, teacher_model: str) -> None:
    # the 6-block MiniLM trained alone: the `minilm` row, or the teacher when the teacher is MiniLM-L6
    base_row = "minilm" if "minilm" in results else "teacher" if teacher_model == "minilm-l6" else None
    base = results[base_row][1] if base_row in results else None
    print("| row | student blocks | parameters | test accuracy | test macro F1 | steps | train s | teacher pass s "
          "| predict samples/s | predict vs MiniLM alone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, (s, speed) in results.items():
        d = s.get("distill", {})
        ratio = f"{speed / base:.2f}x" if base else "-"
        blocks = d.get("student_layers") or ("teacher" if row == "teacher" else "6")
        print(f"| {row} | {blocks} | {s['train']['total_parameters'] / 1e6:.1f}M | {s['test']['accuracy']:.4f} | "
              f"{s['test']['macro_f1']:.4f} | {s['train']['steps']} | {s['train']['seconds']:.0f} | "
              f"{d.get('forward_seconds', 0) if 'teacher' in d else '-'} | {speed:.1f} | {ratio} |")
    for alone, rows in (("minilm", ("distill", "distill_unlabeled", "student3")),
                        ("student3_alone", ("student3", "student3_unlabeled"))):
        if "teacher" not in results or alone not in results:
            continue
        t, a = results["teacher"][0]["test"]["accuracy"], results[alone][0]["test"]["accuracy"]
        for row in rows:
            if row in results and t != a:
                got = results[row][0]["test"]["accuracy"]
                print(f"{row}: closes {(got - a) / (t - a):+.0%} of the accuracy gap between {alone} and the "
                      f"teacher ({a:.4f} -> {got:.4f}, teacher {t:.4f})")


if __name__ == "__main__":
    main()
