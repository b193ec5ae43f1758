"""Domain-adaptive MLM, then fine-tuning, against fine-tuning the original backbone directly.

    nice -n 5 .venv/bin/python bench/pretrain_then_finetune.py                # the table in bench/README.md
    nice -n 5 .venv/bin/python bench/pretrain_then_finetune.py --mlm-steps 300 --seeds 0 1 2

1. MLM: MiniLM-L6 (catalog minilm-l6; the package ships the encoder only, so the MLM head starts new)
   continues pre-training with `task: language_modeling` on the catalog's `rotten_tomatoes_text`: plot
   synopses + review snippets of the training films only, no labels (a text also seen under a test film is
   left out). --mlm-steps steps of --mlm-batch blocks of --block tokens, lr --mlm-lr; 2% of the films held out
   for the validation loss. One MLM run (seed 0) serves every fine-tuning seed.
2. Fine-tuning: an ordinary text_classification config on 200 and 1,000 labelled training rows (sampled with
   seed 0 from the catalog's train split), model.name = the original MiniLM or the MLM run's model/;
   --ft-steps steps (the rest automatic: batch 16, lr 5e-5), early stopping off so both sides take the same
   steps; each seed on both sides. Test: --test-rows rows sampled (seed 0) from the catalog test split:
   films neither phase ever saw.

Prints one line per run and the table (mean ± sd over seeds of test macro F1 and accuracy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

import tunesmith
from tunesmith import catalog


def mlm_phase(work: Path, args) -> tuple[Path, dict]:
    started = time.perf_counter()
    result = tunesmith.train({
        "task": "language_modeling", "model": {"name": "minilm-l6", "max_length": args.block},
        "data": {"dataset": "rotten_tomatoes_text", "validation_fraction": 0.02},
        "train": {"max_steps": args.mlm_steps, "batch_size": args.mlm_batch, "lr": args.mlm_lr, "seed": 0,
                  "eval_every_steps": max(1, args.mlm_steps // 2), "early_stopping_patience": None},
        "output": {"dir": str(work), "name": "mlm"}})
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    evals = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(e["step"], round(e["train_loss"], 3), round(e["validation"]["loss"], 3))
             for e in evals if e.get("type") == "eval"]
    info = {"steps": summary["train"]["steps"], "train_seconds": summary["train"]["seconds"],
            "wall_seconds": round(time.perf_counter() - started, 1), "precision": summary["train"]["precision"],
            "train_blocks": summary["data"]["train_windows"], "train_texts": summary["data"]["train"],
            "curve (step, train loss, validation loss)": curve,
            "validation_perplexity": round(summary["validation"]["perplexity"], 2)}
    print("MLM:", json.dumps(info), flush=True)
    return result.run_dir / "model", info


def finetune(model: str, train_csv: Path, test_csv: Path, seed: int, work: Path, name: str, steps: int | None) -> dict:
    started = time.perf_counter()
    result = tunesmith.train({
        "model": {"name": model}, "data": {"train": str(train_csv), "test": str(test_csv)},
        "train": {"seed": seed, "early_stopping_patience": None, "max_steps": steps},
        "output": {"dir": str(work), "name": name}})
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    return {"macro_f1": result.metrics["macro_f1"], "accuracy": result.metrics["accuracy"],
            "steps": summary["train"]["steps"], "train_seconds": summary["train"]["seconds"],
            "wall_seconds": round(time.perf_counter() - started, 1)}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--mlm-steps", type=int, default=60)
    parser.add_argument("--ft-steps", type=int, default=100, help="fine-tuning steps (0: the automatic plan, 300)")
    parser.add_argument("--test-rows", type=int, default=500)
    parser.add_argument("--mlm-batch", type=int, default=16)
    parser.add_argument("--mlm-lr", type=float, default=1e-4)
    parser.add_argument("--block", type=int, default=64, help="MLM block length in tokens")
    parser.add_argument("--sides", nargs="+", default=["original", "adapted"], choices=["original", "adapted"],
                        help="fine-tune the original MiniLM, the MLM-adapted one, or both (default)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pretrain_then_finetune-"))
    print(f"work folder {work}", flush=True)

    rt = catalog.dataset_path("rotten_tomatoes")
    train_all, test = pd.read_csv(rt / "train.csv"), pd.read_csv(rt / "test.csv")
    test_csv = work / "test.csv"
    test.sample(args.test_rows, random_state=0)[["text", "label"]].to_csv(test_csv, index=False)
    mlm_model, mlm_info = mlm_phase(work, args)
    original = catalog.model_path("minilm-l6")

    rows = []
    for size in args.sizes:
        train_csv = work / f"train_{size}.csv"
        train_all.sample(size, random_state=0)[["text", "label", "film"]].to_csv(train_csv, index=False)
        for seed in args.seeds:  # both sides of one seed back to back: the host's load drifts
            for side, model in (("original MiniLM", original), ("MLM-adapted MiniLM", mlm_model)):
                if side.split()[0].removeprefix("MLM-") not in args.sides:
                    continue
                scores = finetune(str(model), train_csv, test_csv, seed, work, f"ft-{size}-{seed}-{side.split()[0]}",
                                  args.ft_steps or None)
                rows.append({"rows": size, "side": side, "seed": seed, **scores})
                print(json.dumps(rows[-1]), flush=True)

    table = pd.DataFrame(rows)
    print(f"\nMLM phase: {mlm_info['steps']} steps of {args.mlm_batch} x {args.block}-token blocks, lr {args.mlm_lr:g}, "
          f"{mlm_info['train_seconds']:.0f}s of training ({mlm_info['precision']}); "
          f"{mlm_info['train_texts']} texts = {mlm_info['train_blocks']} blocks; "
          f"(step, train loss, validation loss): {mlm_info['curve (step, train loss, validation loss)']}\n")
    print("| labelled rows | backbone | seeds | fine-tuning steps | test macro F1 | test accuracy | train s (mean) |")
    print("|---|---|---|---|---|---|---|")
    for (size, side), group in table.groupby(["rows", "side"], sort=False):
        print(f"| {size:,} | {side} | {len(group)} | {int(group['steps'].iloc[0])} | {mean_sd(group['macro_f1'].tolist())} "
              f"| {mean_sd(group['accuracy'].tolist())} | {group['train_seconds'].mean():.0f} |")
    for size in args.sizes if len(args.sides) == 2 else []:
        part = table[table["rows"] == size]
        diffs = [part[(part.seed == s) & (part.side != "original MiniLM")]["macro_f1"].iloc[0]
                 - part[(part.seed == s) & (part.side == "original MiniLM")]["macro_f1"].iloc[0] for s in args.seeds]
        print(f"{size} rows: MLM-adapted minus original, macro F1 per seed: "
              + ", ".join(f"{d:+.4f}" for d in diffs))


if __name__ == "__main__":
    main()
