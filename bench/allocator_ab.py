"""torch's huge-page allocator path (THP_MEM_ALLOC_ENABLE) on and off, on tunesmith's training step.

    .venv/bin/python bench/allocator_ab.py [--steps 20] [--rounds 4] [--precision fp32|bf16]

torch reads THP_MEM_ALLOC_ENABLE once per process, so each setting runs in its own process, alternating
off / on for --rounds rounds. Each process trains minilm-l6 on length-grouped batches of 32 from the
Rotten Tomatoes train split exactly as train.py does (first-token-only last block, fused AdamW, clipping),
warms up 3 steps, then reports ms per step, minor page faults per step, system CPU seconds per step and
the process's peak RSS. Importing tunesmith sets the variable to 1 unless it is already set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def child(steps: int, precision: str) -> None:
    import resource
    import time

    import torch
    from profile_step import minilm_training_setup  # bench/ is on sys.path: this script's folder

    from tunesmith.tasks import text_classification as tc

    model, tok, enc, batches, opt = minilm_training_setup(steps + 3)

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**tc.make_collate(tok, 1)([enc.features[i] for i in b])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:3]:
        step(b)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for b in batches[3:]:
        step(b)
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"ms_per_step": 1000 * seconds / steps,
                      "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                      "sys_s_per_step": (after.ru_stime - before.ru_stime) / steps,
                      "peak_rss_mb": after.ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.steps, args.precision)
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for round_ in range(args.rounds):
        for setting in runs:
            out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps),
                                  "--precision", args.precision], check=True,
                                 capture_output=True, text=True, env=os.environ | {"THP_MEM_ALLOC_ENABLE": setting})
            runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[setting][-1]
            print(f"round {round_ + 1}, THP_MEM_ALLOC_ENABLE={setting}: {r['ms_per_step']:.0f} ms/step, "
                  f"{r['faults_per_step']:.0f} minor faults/step, {r['sys_s_per_step'] * 1000:.0f} ms system/step, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print("\n| THP_MEM_ALLOC_ENABLE | ms/step (median) | minor faults/step (median) | system ms/step (median) "
          "| peak RSS MB (median) |")
    print("|---|---|---|---|---|")
    for setting, rs in runs.items():
        ms, faults, sys_s, rss = (statistics.median(r[key] for r in rs)
                                  for key in ("ms_per_step", "faults_per_step", "sys_s_per_step", "peak_rss_mb"))
        print(f"| {setting} | {ms:.0f} | {faults:.0f} | {1000 * sys_s:.0f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
