"""What the report costs at the end of a run, on real runs (MiniLM-L6 from the catalog).

Each config trains in its own process, cut to --steps optimizer steps (the report reads the logs and the
test predictions; the whole test split is predicted whatever the steps), with the report on: the seconds
the run logs for it ("report in ... (X s)": reading the folder, drawing, writing, matplotlib's first
import included) are shown beside the run's training seconds. Then, in a fresh process with tunesmith
imported (as at the end of training), write_report is timed twice: cold (matplotlib imported by it) and
warm, in wall and CPU seconds (CPU seconds are the fairer figure on a shared machine).

    nice -n 5 .venv/bin/python bench/report_cost.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {"rotten_tomatoes": "configs/rotten_tomatoes.yaml", "wnut_tweets": "configs/wnut_tweets.yaml"}
REPO = Path(__file__).resolve().parents[1]
TIMER = """
import sys, time
import tunesmith
from tunesmith.report import write_report
for label in ("cold", "warm"):
    wall, cpu = time.perf_counter(), time.process_time()
    write_report([sys.argv[1]])
    print(label, time.perf_counter() - wall, time.process_time() - cpu)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "tunesmith.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in CONFIGS.items():
            out = subprocess.run(cli + ["train", str(REPO / config), "--train.max_steps", str(args.steps),
                                        "--output.dir", tmp, "--output.name", name],
                                 capture_output=True, text=True, cwd=REPO)
            if out.returncode != 0:
                sys.exit(out.stderr[-2000:])
            run = Path(tmp) / name
            at_end = float(re.search(r"report in .* \(([\d.]+)s\)", out.stderr).group(1))
            summary = json.loads((run / "metrics.json").read_text())
            timed = subprocess.run([sys.executable, "-c", TIMER, str(run)], capture_output=True, text=True,
                                   check=True, cwd=REPO).stdout.split()
            cold_wall, cold_cpu, warm_wall, warm_cpu = (float(timed[i]) for i in (1, 2, 4, 5))
            rows.append((name, summary["train"]["seconds"], summary["data"]["test"], at_end, cold_wall, cold_cpu,
                         warm_wall, warm_cpu, (run / "report.html").stat().st_size / 1024))
    print("| run | train s | test rows | report at end of train, wall s | cold wall / CPU s | warm wall / CPU s | HTML KiB |")
    print("|---|---|---|---|---|---|---|")
    for name, train_s, n_test, at_end, cw, cc, ww, wc, kib in rows:
        print(f"| {name} | {train_s:.1f} | {n_test:,} | {at_end:.1f} | {cw:.1f} / {cc:.1f} | {ww:.1f} / {wc:.1f} | {kib:.0f} |")


if __name__ == "__main__":
    main()
