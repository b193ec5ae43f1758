"""What `import tunesmith` (and a text run's task) costs a fresh process, for one or more checkouts.

    .venv/bin/python bench/startup.py                                  # this checkout
    .venv/bin/python bench/startup.py --src /work/main/src src --rounds 5   # before / after, alternating
    .venv/bin/python bench/startup.py --first-step --rounds 3   # the demo to its first step: cold / warm worker

Each round starts one fresh interpreter per checkout (alternating, so a change in the host's load hits
both) that imports tunesmith, the CLI and the text classification task, as `tunesmith train` does before
it reads the config. Reported per checkout, medians over the rounds: wall seconds, CPU seconds (user +
system: much less sensitive to other jobs on a shared machine than wall time), and the modules loaded.

--first-step: the demo config (configs/rotten_tomatoes.yaml) for one step without its test split, by the
`tunesmith` command of this checkout's .venv, alternating a cold process (TUNESMITH_WORKER=0) and a warm
worker's child (`tunesmith worker start`, a worker of its own). Reported: the seconds from the command's
start to the end of the first step, their parts (metrics.json `timing`) and the command's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import resource, sys, time
t = time.perf_counter()
import tunesmith, tunesmith.cli
from tunesmith.tasks import TASKS
TASKS["text_classification"]
wall = time.perf_counter() - t
u = resource.getrusage(resource.RUSAGE_SELF)
heavy = [m for m in ("torchvision", "timm", "optuna", "peft", "scipy.stats", "sklearn", "pandas", "accelerate")
         if m in sys.modules]
print(json.dumps({"wall": wall, "cpu": u.ru_utime + u.ru_stime, "modules": len(sys.modules), "heavy": heavy}))
""".replace("import resource", "import json, resource")


def measure(src: Path) -> dict:
    env = os.environ | {"PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def first_step(rounds: int) -> None:
    import tempfile
    import time

    root = Path(__file__).resolve().parents[1]
    command = [str(root / ".venv" / "bin" / "tunesmith")]
    scratch = Path(tempfile.mkdtemp(prefix="startup-"))
    env = os.environ | {"TUNESMITH_WORKER_DIR": str(scratch / "w")}
    started = subprocess.run(command + ["worker", "start", "--idle-minutes", "30"], env=env, capture_output=True,
                             text=True, check=True)
    print(started.stderr.strip())
    rows: dict[str, list[dict]] = {"cold": [], "warm": []}
    try:
        for i in range(rounds):
            for side in rows:
                run_env = env | ({"TUNESMITH_WORKER": "0"} if side == "cold" else {})
                t = time.perf_counter()
                subprocess.run(command + ["train", str(root / "configs" / "rotten_tomatoes.yaml"), "--train.max_steps",
                                          "1", "--data.test", "false", "--output.dir", str(scratch / "runs"),
                                          "--output.name", f"{side}{i}"],
                               env=run_env, capture_output=True, check=True)
                metrics = json.loads((scratch / "runs" / f"{side}{i}" / "metrics.json").read_text())
                assert metrics["warm_worker"] == (side == "warm")
                timing = metrics["timing"]
                rows[side].append(dict(timing, to_first_step=timing["before_train"] + timing["first_step"],
                                       wall=time.perf_counter() - t))
    finally:
        subprocess.run(command + ["worker", "stop"], env=env, capture_output=True)
    keys = ("to_first_step", "before_train", "read_data", "load_model", "encode", "first_step", "wall")
    print(f"\nload average {os.getloadavg()[0]:.1f}; {rounds} rounds each, alternating; medians (min-max), seconds\n")
    print("| start | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for side, runs in rows.items():
        cells = [f"{statistics.median(r[k] for r in runs):.2f} ({min(r[k] for r in runs):.2f}-"
                 f"{max(r[k] for r in runs):.2f})" for k in keys]
        print(f"| {side} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", nargs="+", type=Path, default=[Path(__file__).resolve().parents[1] / "src"],
                        help="src/ folders of the checkouts to compare")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--first-step", action="store_true",
                        help="the demo to its first step, cold against a warm worker (see above)")
    args = parser.parse_args()
    if args.first_step:
        return first_step(args.rounds)
    runs: dict[Path, list[dict]] = {src: [] for src in args.src}
    measure(args.src[0])  # warm the page cache once
    for _ in range(args.rounds):
        for src in args.src:
            runs[src].append(measure(src))
    print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds, medians (min-max)\n")
    print("| checkout | import wall s | import CPU s | modules | heavy modules loaded |")
    print("|---|---|---|---|---|")
    for src, rs in runs.items():
        wall, cpu = [r["wall"] for r in rs], [r["cpu"] for r in rs]
        print(f"| {src} | {statistics.median(wall):.2f} ({min(wall):.2f}-{max(wall):.2f}) | "
              f"{statistics.median(cpu):.2f} ({min(cpu):.2f}-{max(cpu):.2f}) | {rs[0]['modules']} | "
              f"{', '.join(rs[0]['heavy'])} |")


if __name__ == "__main__":
    main()
