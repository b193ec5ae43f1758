"""Class imbalance and few-shot augmentation on MiniLM-L6 + Rotten Tomatoes (test films unseen in training).

    OMP_NUM_THREADS=1 .venv/bin/python bench/imbalance.py --train-rows 4000 --epochs 2

(a) Imbalance: sample --train-rows training rows (seed 0), then keep only 10% of the 'rotten' rows
    (the train split only; the test split is untouched). Train with imbalance.method none,
    class_weights ('balanced') and oversample, and report macro F1, accuracy and the recall of each class
    on the whole film-disjoint test split.
(b) Few-shot: --shots training rows (half per class, a new sample per seed), trained with and without
    augmentation (WordNet synonym + insert, swap, delete), for each of --seeds; mean and std on the
    same test split.
No validation split (validation_fraction 0): every run keeps its last model, so the runs differ only
in what is measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

MINORITY = "rotten"
AUGMENT = [{"op": "synonym", "p": 0.5, "n": 1}, {"op": "insert", "p": 0.2, "n": 1},
           {"op": "swap", "p": 0.2, "n": 1}, {"op": "delete", "p": 0.2, "rate": 0.1}]


def rotten_tomatoes() -> tuple[pd.DataFrame, pd.DataFrame]:
    from tunesmith import catalog

    source = catalog.dataset_path("rotten_tomatoes")
    return pd.read_csv(source / "train.csv"), pd.read_csv(source / "test.csv")


def run(train: pd.DataFrame, test_csv: Path, folder: Path, name: str, train_cfg: dict, extra: dict) -> dict:
    import tunesmith

    train_csv = folder / f"{name}.csv"
    train.to_csv(train_csv, index=False)
    cfg = {"model": {"name": "minilm-l6", "max_length": 128},
           "data": {"train": str(train_csv), "test": str(test_csv), "validation_fraction": 0.0},
           "train": {"batch_size": 32, "lr": 5e-5, "weight_decay": 0.01, "warmup_ratio": 0.1, "seed": 0, **train_cfg},
           "output": {"dir": str(folder / "runs"), "name": name}, **extra}
    started = time.perf_counter()
    result = tunesmith.train(cfg)
    m = result.metrics
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    return {"name": name, "macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
            "recall": {c: v["recall"] for c, v in m["per_class"].items()},
            "weights": summary["imbalance"].get("weights"), "seconds": time.perf_counter() - started}


def imbalance_part(args, train_all: pd.DataFrame, test_csv: Path, folder: Path) -> list[dict]:
    train = train_all.sample(n=min(args.train_rows, len(train_all)), random_state=0) if args.train_rows else train_all
    minority = train[train["label"] == MINORITY]
    kept = minority.sample(frac=0.1, random_state=0)
    train = pd.concat([train[train["label"] != MINORITY], kept]).sample(frac=1.0, random_state=0)
    counts = train["label"].value_counts().to_dict()
    print(f"(a) imbalanced train: {len(train)} rows ({counts}); kept {len(kept)} of {len(minority)} '{MINORITY}' rows",
          flush=True)
    rows = []
    for method in ("none", "class_weights", "oversample"):
        row = run(train, test_csv, folder, f"imb-{method}", {"epochs": args.epochs}, {"imbalance": {"method": method}})
        rows.append(row)
        print(f"  {method}: macro F1 {row['macro_f1']:.4f} ({row['seconds']:.0f}s)", flush=True)
    return rows


def few_shot_part(args, train_all: pd.DataFrame, test_csv: Path, folder: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"none": [], "augment": []}
    per_class = args.shots // 2
    for seed in args.seeds:
        train = pd.concat([g.sample(n=per_class, random_state=seed) for _, g in train_all.groupby("label")])
        train = train.sample(frac=1.0, random_state=seed)
        for name, extra in (("none", {}), ("augment", {"augment": AUGMENT})):
            row = run(train, test_csv, folder, f"few-{name}-{seed}",
                      {"epochs": args.shot_epochs, "batch_size": 16, "lr": 1e-4, "seed": seed}, extra)
            out[name].append(row)
            print(f"  few-shot seed {seed} {name}: macro F1 {row['macro_f1']:.4f} ({row['seconds']:.0f}s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-rows", type=int, default=4000, help="(a) sample this many rows first; 0: all")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--shots", type=int, default=64)
    parser.add_argument("--shot-epochs", type=float, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip", choices=["imbalance", "few-shot"])
    args = parser.parse_args()

    train_all, test = rotten_tomatoes()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}; "
          f"test: {len(test)} rows from unseen films ({test['label'].value_counts().to_dict()})", flush=True)
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        folder = Path(tmp)
        test_csv = folder / "test.csv"
        test.to_csv(test_csv, index=False)
        imb = imbalance_part(args, train_all, test_csv, folder) if args.skip != "imbalance" else []
        few = few_shot_part(args, train_all, test_csv, folder) if args.skip != "few-shot" else {}
    if imb:
        print(f"\n(a) imbalanced training ({args.epochs:g} epoch(s)), whole test split:\n")
        print("| imbalance.method | macro F1 | accuracy | recall fresh | recall rotten | class weights |")
        print("|---|---|---|---|---|---|")
        for r in imb:
            w = ", ".join(f"{k} {v:.3f}" for k, v in r["weights"].items()) if r["weights"] else "-"
            print(f"| {r['name'][4:]} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} | {r['recall']['fresh']:.4f} "
                  f"| {r['recall']['rotten']:.4f} | {w} |")
    if few:
        print(f"\n(b) few-shot: {args.shots} training rows, {args.shot_epochs:g} epochs, seeds {args.seeds}, "
              "whole test split (mean ± std over seeds):\n")
        print("| augmentation | macro F1 | accuracy | per seed macro F1 |")
        print("|---|---|---|---|")
        for name, rows in few.items():
            f1 = np.array([r["macro_f1"] for r in rows])
            acc = np.array([r["accuracy"] for r in rows])
            label = "none" if name == "none" else "synonym 0.5, insert 0.2, swap 0.2, delete 0.2 (rate 0.1)"
            print(f"| {label} | {f1.mean():.4f} ± {f1.std():.4f} | {acc.mean():.4f} ± {acc.std():.4f} "
                  f"| {', '.join(f'{x:.4f}' for x in f1)} |")


if __name__ == "__main__":
    main()
