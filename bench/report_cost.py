"""What the report costs at the end of a run: seconds and size, on real runs (MiniLM-L6 from the catalog).

Each config trains in its own process, cut to --steps optimizer steps (the report reads the logs and the
test predictions, whose size does not depend on the steps: the whole test split is predicted), with the
report on; the seconds the run itself logs for it ("report in ... (X s)": reading the folder, drawing,
writing, matplotlib's import included) are shown beside the training time. Then `tunesmith report RUN`
is timed --repeats times in fresh processes (wall time, the interpreter's start and tunesmith's import
included).

    nice -n 5 .venv/bin/python bench/report_cost.py [--steps 60] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"rotten_tomatoes (binary, 2,773 test reviews)": "configs/rotten_tomatoes.yaml",
           "wnut_tweets (NER, 10 entity types)": "configs/wnut_tweets.yaml"}
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env_cmd = [sys.executable, "-m", "tunesmith.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            out = subprocess.run(env_cmd + ["train", str(REPO / config), "--train.max_steps", str(args.steps),
                                            "--output.dir", tmp, "--output.name", name.split()[0]],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                sys.exit(out.stderr[-2000:])
            run = Path(tmp) / name.split()[0]
            at_end = float(re.search(r"report in .* \(([\d.]+)s\)", out.stderr).group(1))
            summary = json.loads((run / "metrics.json").read_text())
            walls = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                subprocess.run(env_cmd + ["report", str(run)], check=True, capture_output=True, cwd=REPO)
                walls.append(time.perf_counter() - started)
            rows.append((name, summary["train"]["seconds"], summary["data"]["test"], at_end, min(walls),
                         max(walls), (run / "report.html").stat().st_size / 1024))
    print(f"{'run':<46} {'train s':>8} {'test rows':>9} {'report at end s':>15} "
          f"{'tunesmith report s (min-max)':>28} {'HTML KiB':>8}")
    for name, train_s, n_test, at_end, low, high, kib in rows:
        print(f"{name:<46} {train_s:>8.1f} {n_test:>9} {at_end:>15.1f} {f'{low:.1f}-{high:.1f}':>28} {kib:>8.0f}")


if __name__ == "__main__":
    main()
