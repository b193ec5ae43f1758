"""What `import tunesmith` (and a text run's task) costs a fresh process, for one or more checkouts.

    .venv/bin/python bench/startup.py                                  # this checkout
    .venv/bin/python bench/startup.py --src /work/main/src src --rounds 5   # before / after, alternating

Each round starts one fresh interpreter per checkout (alternating, so a change in the host's load hits
both) that imports tunesmith, the CLI and the text classification task, as `tunesmith train` does before
it reads the config. Reported per checkout, medians over the rounds: wall seconds, CPU seconds (user +
system: much less sensitive to other jobs on a shared machine than wall time), and the modules loaded.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", nargs="+", type=Path, default=[Path(__file__).resolve().parents[1] / "src"],
                        help="src/ folders of the checkouts to compare")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
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
