"""Every fine-tuning strategy on MiniLM-L6 + Rotten Tomatoes (test films unseen in training).

    .venv/bin/python bench/strategies.py --train-rows 2500

Each strategy trains in its own process (so peak RSS is its own) on the same sampled training rows
(fixed seed; 10% of them held out by film for validation) and is tested on the catalog's
film-disjoint test split. Prints a markdown table, then the per-epoch speed-up of the cached linear
probe over the same linear probe without the cache, both measured in this run.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

# name -> (train overrides, strategy section). lr per strategy: what each usually needs.
STRATEGIES: dict[str, tuple[dict, dict]] = {
    "full": ({"epochs": 1, "lr": 5e-5}, {"name": "full"}),
    "full + layerwise_lr_decay 0.8": ({"epochs": 1, "lr": 1e-4}, {"name": "full", "layerwise_lr_decay": 0.8}),
    "freeze bottom 4 of 6 (+ embeddings)": ({"epochs": 2, "lr": 1e-4}, {"name": "freeze", "freeze_layers": 4}),
    "gradual_unfreeze (every 1/4 epoch)": ({"epochs": 2, "lr": 1e-4},
                                           {"name": "gradual_unfreeze", "unfreeze_every_epochs": 0.25}),
    "lora r=8 (query, value), merged": ({"epochs": 2, "lr": 5e-4}, {"name": "lora", "lora": {"r": 8}}),
    "linear_probe, cached features": ({"epochs": 4, "lr": 2e-3}, {"name": "linear_probe"}),
    "linear_probe, no cache": ({"epochs": 4, "lr": 2e-3}, {"name": "linear_probe", "cache_features": "off"}),
}


def prepare_data(folder: Path, train_rows: int | None, test_rows: int | None) -> tuple[Path, Path]:
    from tunesmith import catalog

    source = catalog.dataset_path("rotten_tomatoes")
    train, test = pd.read_csv(source / "train.csv"), pd.read_csv(source / "test.csv")
    if train_rows:
        train = train.sample(n=min(train_rows, len(train)), random_state=0)
    if test_rows:
        test = test.sample(n=min(test_rows, len(test)), random_state=0)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return folder / "train.csv", folder / "test.csv"


def run_one(name: str, folder: Path) -> dict:
    """Train one strategy in this process; returns its row of the table."""
    import tunesmith

    train_overrides, strategy = STRATEGIES[name]
    cfg = {"model": {"name": "minilm-l6", "max_length": 128},
           "data": {"train": str(folder / "train.csv"), "test": str(folder / "test.csv"), "group_column": "film",
                    "validation_fraction": 0.1},
           "train": {"batch_size": 32, "weight_decay": 0.01, "warmup_ratio": 0.1, "seed": 0, **train_overrides},
           "strategy": strategy, "output": {"dir": str(folder / "runs")}}
    result = tunesmith.train(cfg)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    s = summary["strategy"]
    return {"strategy": name, "epochs": train_overrides["epochs"], "accuracy": result.metrics["accuracy"],
            "macro_f1": result.metrics["macro_f1"], "train_seconds": summary["train"]["seconds"],
            "samples_per_second": summary["train"]["samples_per_second"], "epoch_seconds": s["epoch_seconds"],
            "cache": s["feature_cache"], "precision": summary["train"]["precision"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable": s["trainable_parameters"], "total": s["total_parameters"], "train_rows": summary["data"]["train"]}


def table(rows: list[dict]) -> str:
    lines = ["| strategy | epochs | test accuracy | macro F1 | train s | samples/s | s per epoch | peak RSS MiB "
             "| trainable params |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_epoch = " / ".join(f"{t:.1f}" for t in r["epoch_seconds"])
        if r["cache"]:
            per_epoch += f" (+ {r['cache']['seconds']:.1f} cache build)"
        lines.append(f"| {r['strategy']} | {r['epochs']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} "
                     f"| {r['train_seconds']:.1f} | {r['samples_per_second']:.1f} | {per_epoch} "
                     f"| {r['peak_rss_mib']:.0f} | {r['trainable']:,} of {r['total']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=2500, help="sample this many training rows (seed 0); 0: all")
    parser.add_argument("--test-rows", type=int, default=0, help="0: the whole film-disjoint test split")
    parser.add_argument("--only", nargs="*", help="strategy names (default: all)")
    parser.add_argument("--one", help=argparse.SUPPRESS)     # internal: run one strategy, print its JSON row
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, Path(args.data))), flush=True)
        return

    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        folder = Path(tmp)
        train_csv, test_csv = prepare_data(folder, args.train_rows or None, args.test_rows or None)
        print(f"data: {len(pd.read_csv(train_csv))} sampled training rows (10% held out by film for validation), "
              f"{len(pd.read_csv(test_csv))} test rows from unseen films; {platform.processor() or platform.machine()}",
              flush=True)
        rows = []
        for name in args.only or STRATEGIES:
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--one", name, "--data", str(folder)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            row = json.loads(next(line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")))
            rows.append(row)
            print(f"{name}: accuracy {row['accuracy']:.4f}, {row['train_seconds']:.1f}s training, "
                  f"{time.perf_counter() - started:.0f}s with evaluation and start-up", flush=True)
    print()
    print(table(rows))
    by_name = {r["strategy"]: r for r in rows}
    cached, plain = by_name.get("linear_probe, cached features"), by_name.get("linear_probe, no cache")
    if cached and plain:
        per_epoch = lambda r: sum(r["epoch_seconds"]) / len(r["epoch_seconds"])  # noqa: E731
        ratio = per_epoch(plain) / per_epoch(cached)
        whole = plain["train_seconds"] / cached["train_seconds"]
        print(f"\nlinear probe, same run: {per_epoch(plain):.2f}s per epoch without the cache, "
              f"{per_epoch(cached):.2f}s from the cache: {ratio:.1f}x faster per epoch; "
              f"whole training including the one-off cache build ({cached['cache']['seconds']:.1f}s): "
              f"{whole:.1f}x faster over {cached['epochs']} epochs")
        print(f"test accuracy cached {cached['accuracy']:.4f} vs uncached {plain['accuracy']:.4f}")


if __name__ == "__main__":
    main()
