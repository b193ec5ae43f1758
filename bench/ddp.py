"""Training speed with 1 and 2 processes (DDP, gloo on the CPU) on the same global batch.

all-MiniLM-L6-v2 on Rotten Tomatoes (the catalog's train split, 8,983 rows; no validation split, so
nothing but training happens before the test split), the same number of optimizer steps of a global
batch of 32: one process with train.batch_size 32 against `--processes 2` with 16 each. Each run is a
fresh `tunesmith train` process (launch, imports and tokenizing included in wall s); the figures are
read from the run's metrics.json: train samples/s (global samples per second of training), test
samples/s (the 2,773 test reviews, gathered over the processes). Rounds alternate 1, 2, 1, 2 ... so a
change in the host's speed hits both sides.

    nice -n 5 .venv/bin/python bench/ddp.py --steps 60 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(processes: int, steps: int, out: Path, name: str, threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "tunesmith", "train", str(ROOT / "configs" / "rotten_tomatoes.yaml"),
           "--train.max_steps", str(steps), "--train.batch_size", str(32 // processes),
           "--data.validation_fraction", "0", "--output.dir", str(out), "--output.name", name]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # 2 threads alone, 1 each for two
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    m = json.loads((out / name / "metrics.json").read_text())
    return {"processes": processes, "threads": threads or max(1, (os.cpu_count() or 1) // processes),
            "batch": f"{32 // processes} x {processes}", "steps": m["train"]["steps"],
            "train_s": m["train"]["seconds"], "train_sps": m["train"]["samples_per_second"],
            "test_sps": m["test_samples_per_second"], "accuracy": m["test"]["accuracy"], "wall_s": wall,
            "precision": m["train"]["precision"], "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first", type=int, choices=(1, 2), default=1, help="processes of each round's first run")
    parser.add_argument("--one-thread", action="store_true",
                        help="also run one process with one thread (on a loaded host, two threads of one process "
                             "wait on each other)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in ((1, 2) if args.first == 1 else (2, 1)):
                rows.append(run(n, args.steps, Path(tmp), f"p{n}-r{r}"))
                print(f"round {r}, {n} process(es): {rows[-1]}", file=sys.stderr)
            if args.one_thread:
                rows.append(run(1, args.steps, Path(tmp), f"p1t1-r{r}", threads=1))
                print(f"round {r}, 1 process, 1 thread: {rows[-1]}", file=sys.stderr)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, {args.steps} steps "
          f"of a global batch of 32, precision {rows[0]['precision']}")
    print("| processes | threads each | batch per process x n | steps | train s | train samples/s | test samples/s | "
          "test accuracy | wall s | load avg (1 min, at the end) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['processes']} | {x['threads']} | {x['batch']} | {x['steps']} | {x['train_s']:.1f} | {x['train_sps']:.1f} | "
              f"{x['test_sps']:.1f} | {x['accuracy']:.4f} | {x['wall_s']:.0f} | {x['load']:.1f} |")
    for n, t in sorted({(x["processes"], x["threads"]) for x in rows}):
        mine = [x for x in rows if (x["processes"], x["threads"]) == (n, t)]
        print(f"mean, {n} process(es) x {t} thread(s): train {sum(x['train_sps'] for x in mine) / len(mine):.1f} samples/s, "
              f"test {sum(x['test_sps'] for x in mine) / len(mine):.1f} samples/s, "
              f"wall {sum(x['wall_s'] for x in mine) / len(mine):.0f} s")


if __name__ == "__main__":
    main()
