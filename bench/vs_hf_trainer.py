"""tunesmith vs the Hugging Face Trainer on identical work, measured in one script.

    .venv/bin/python bench/vs_hf_trainer.py                 # full Rotten Tomatoes train split (slow on CPU)
    .venv/bin/python bench/vs_hf_trainer.py --train-rows 3000
    .venv/bin/python bench/vs_hf_trainer.py --train-rows 4000 --seeds 0 1 2   # accuracy as mean +- std

Same model (minilm-l6), same film-disjoint split, max_length 128, batch 32, lr 5e-5, weight decay 0.01,
10% warm-up, 1 epoch, seed 0, dynamic padding, no validation during training. Each side runs in its
own process (so peak RSS is its own), one after the other. With --seeds, hf_best and tunesmith train
once per seed (the training sample stays the one drawn with seed 0) and the table shows means, with
the accuracy's standard deviation over seeds; hf_default, a speed reference, runs with the first seed
only. Sides:
  hf_default  Trainer with its defaults (random batches, fp32)
  hf_best     Trainer's recommended speed setting: group_by_length, + bf16 where the CPU/GPU runs bf16 fast
  (hf_best_pad16, with --hf-pad16: the same with its collator padding to multiples of 16)
Ratios are against whichever Trainer setting trained fastest in this run.
  tunesmith   tunesmith's defaults
Then inference: HF pipeline("text-classification", batch_size=32) vs tunesmith predict on the test texts,
3 alternating passes each in one process (medians).
Allocator: importing tunesmith sets THP_MEM_ALLOC_ENABLE=1 (huge-page-advised large CPU tensors); the
Trainer and inference processes run with torch's default (0) unless you set the variable yourself.
MFU = model FLOPs (6 x non-embedding params x real tokens for training, 2x for inference) per second,
divided by the fp32 (or bf16) matmul throughput measured on this machine at the start.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

# as the user left it, before any tunesmith import sets its default
USER_THP = os.environ.get("THP_MEM_ALLOC_ENABLE")
SAMPLE_SEED, MAX_LEN, BATCH, LR, WD, WARMUP = 0, 128, 32, 5e-5, 0.01, 0.1
INFERENCE_ROUNDS = 3


def torch_default_env() -> dict[str, str]:
    """The environment for a process that is not tunesmith's: torch's own allocator setting."""
    return os.environ | {"THP_MEM_ALLOC_ENABLE": USER_THP or "0"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def matmul_peak(dtype_name: str, n: int = 4096) -> float:
    """Best of three timings of n x n matmuls: the FLOP/s this machine can reach at all."""
    import torch
    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    reps = 50 if device == "cuda" else 3
    best = 0.0
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t))
    return best


def prepare(workdir: Path, train_rows: int | None) -> tuple[Path, Path]:
    from tunesmith import catalog
    folder = catalog.dataset_path("rotten_tomatoes")
    train = pd.read_csv(folder / "train.csv")
    if train_rows:
        train = train.sample(train_rows, random_state=SAMPLE_SEED)
    train.to_csv(workdir / "train.csv", index=False)
    return workdir / "train.csv", folder / "test.csv"


def real_tokens(texts: list[str]) -> int:
    from transformers import AutoTokenizer
    from tunesmith import catalog
    tok = AutoTokenizer.from_pretrained(catalog.model_path("minilm-l6"))
    return sum(len(x) for x in tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"])


def non_embedding_params() -> int:
    from transformers import AutoModelForSequenceClassification
    from tunesmith import catalog
    model = AutoModelForSequenceClassification.from_pretrained(catalog.model_path("minilm-l6"), num_labels=2)
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)


def run_hf(train_csv: Path, test_csv: Path, best: bool, workdir: Path, seed: int,
           pad_multiple: int | None = None) -> dict:
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)
    from transformers.utils import logging
    from tunesmith import catalog
    from tunesmith.inference import choose_precision

    logging.set_verbosity_error()
    path = catalog.model_path("minilm-l6")
    train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    names = sorted(set(train["label"]))
    tok = AutoTokenizer.from_pretrained(path)

    def encode(df):
        enc = tok(df["text"].tolist(), truncation=True, max_length=MAX_LEN)
        return [{"input_ids": ids, "attention_mask": m, "labels": names.index(y)}
                for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], df["label"])]

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    bf16 = best and choose_precision("auto") == "bf16"
    common = dict(
        output_dir=str(workdir / "hf"), per_device_train_batch_size=BATCH, per_device_eval_batch_size=128,
        learning_rate=LR, weight_decay=WD, warmup_steps=WARMUP, num_train_epochs=1, seed=seed,
        bf16=bf16, use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True)
    try:
        args = TrainingArguments(**common, train_sampling_strategy="group_by_length" if best else "random")
    except TypeError:  # transformers releases before train_sampling_strategy
        args = TrainingArguments(**common, group_by_length=best)
    trainer = Trainer(model=model, args=args, train_dataset=encode(train),
                      data_collator=DataCollatorWithPadding(tok, pad_to_multiple_of=pad_multiple))
    out = trainer.train()
    pred = trainer.predict(encode(test))
    y_pred = pred.predictions.argmax(-1)
    return {"train_samples_per_second": out.metrics["train_samples_per_second"],
            "eval_samples_per_second": pred.metrics["test_samples_per_second"],
            "accuracy": accuracy_score(pred.label_ids, y_pred),
            "macro_f1": f1_score(pred.label_ids, y_pred, average="macro"),
            "precision": "bf16" if bf16 else "fp32", "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}


def run_tunesmith(train_csv: Path, test_csv: Path, workdir: Path, seed: int, precision: str = "auto") -> dict:
    import tunesmith
    result = tunesmith.train({
        "model": {"name": "minilm-l6", "max_length": MAX_LEN},
        "data": {"train": str(train_csv), "test": str(test_csv), "validation_fraction": 0},
        "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "weight_decay": WD, "warmup_ratio": WARMUP,
                  "seed": seed, "precision": precision},
        "output": {"dir": str(workdir / "runs"), "name": f"bench-{precision}-seed{seed}"}})
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    return {"train_samples_per_second": summary["train"]["samples_per_second"],
            "eval_samples_per_second": summary["test_samples_per_second"],
            "accuracy": result.metrics["accuracy"], "macro_f1": result.metrics["macro_f1"],
            "precision": summary["train"]["precision"], "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb(),
            "run_dir": str(result.run_dir)}


def run_inference(run_dir: Path, test_csv: Path, rounds: int = INFERENCE_ROUNDS) -> dict:
    """The pipeline and tunesmith's predict, each loaded once and warmed up, then timed over the whole
    test file in alternating passes (so a change in the host's speed hits both); medians of the passes."""
    from transformers import pipeline
    texts = pd.read_csv(test_csv)["text"].tolist()
    import torch
    pipe = pipeline("text-classification", model=str(run_dir / "model"), batch_size=32,
                    device=0 if torch.cuda.is_available() else "cpu",
                    truncation=True, max_length=MAX_LEN)
    from tunesmith.inference import LoadedRun
    loaded = LoadedRun(run_dir)  # loaded once, like the pipeline: the timing is prediction only

    def predict_file():
        examples = loaded.task.read_examples(test_csv, loaded.cfg, loaded.labels, require_labels=False)
        return loaded.task.predictions_frame(examples, loaded.logits(examples), loaded.labels)

    pipe(texts[:64])  # warm-up
    predict_file()
    hf, ours = [], []
    for _ in range(rounds):
        for times, run in ((hf, lambda: pipe(texts)), (ours, predict_file)):
            t = time.perf_counter()
            run()
            times.append(len(texts) / (time.perf_counter() - t))
    return {"hf_pipeline_samples_per_second": statistics.median(hf),
            "tunesmith_predict_samples_per_second": statistics.median(ours),
            "hf_pipeline_rounds": hf, "tunesmith_predict_rounds": ours}


def mean_over_seeds(runs: list[dict]) -> dict:
    """One side's runs (one per seed) as one row: means, the accuracy's spread, the highest peak memory."""
    row = dict(runs[0], seeds=[r["seed"] for r in runs])
    for key in ("train_samples_per_second", "eval_samples_per_second", "accuracy", "macro_f1"):
        values = [float(r[key]) for r in runs]
        row[key], row[key + "_std"] = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    for key in ("peak_rss_mb", "peak_gpu_mb"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = max(values) if values else None
    return row


def child(args) -> None:
    workdir = Path(args.workdir)
    train_csv, test_csv = Path(args.train_csv), Path(args.test_csv)
    if args.side.startswith("tunesmith"):  # tunesmith, or tunesmith_<precision>
        res = run_tunesmith(train_csv, test_csv, workdir, int(args.seed), args.side.partition("_")[2] or "auto")
    elif args.side == "inference":
        res = run_inference(Path(args.run_dir), test_csv)
    else:
        res = run_hf(train_csv, test_csv, args.side != "hf_default", workdir, int(args.seed),
                     16 if args.side == "hf_best_pad16" else None)
    Path(args.out).write_text(json.dumps(res))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-rows", type=int, default=None, help="sample this many training rows (default: all)")
    parser.add_argument("--also-precision", nargs="*", default=[], choices=["fp32", "bf16"],
                        help="also run tunesmith with this train.precision (beside its default, auto)")
    parser.add_argument("--hf-pad16", action="store_true",
                        help="also run the Trainer's best setting with its collator padding to multiples of 16")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds (default: 0); with several, the table shows means over seeds")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    for hidden in ("--workdir", "--train-csv", "--test-csv", "--out", "--run-dir", "--seed"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:  # ~350 MB per run: never left behind
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, workdir: Path) -> None:
    """Train every side on the same rows inside `workdir`, then print the table and the ratios."""
    train_csv, test_csv = prepare(workdir, args.train_rows)
    n_train = len(pd.read_csv(train_csv))
    test_texts = pd.read_csv(test_csv)["text"].tolist()
    train_tokens = real_tokens(pd.read_csv(train_csv)["text"].tolist())
    n_params = non_embedding_params()
    from tunesmith.inference import choose_precision
    peaks = {"fp32": matmul_peak("float32")}
    if choose_precision("auto") == "bf16":  # bf16 matmul without hardware support takes minutes: skip it
        peaks["bf16"] = matmul_peak("bfloat16")

    runs: dict[str, list[dict]] = {}
    sides = ["hf_default", "hf_best"] + ["hf_best_pad16"] * args.hf_pad16 + ["tunesmith"] \
        + [f"tunesmith_{p}" for p in args.also_precision]
    for seed in args.seeds:
        for side in sides:
            if side == "hf_default" and seed != args.seeds[0]:
                continue
            out = workdir / f"{side}-seed{seed}.json"
            print(f"running {side}, seed {seed} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--side", side, "--seed", str(seed), "--workdir", str(workdir),
                            "--train-csv", str(train_csv), "--test-csv", str(test_csv), "--out", str(out)],
                           check=True, env=None if side.startswith("tunesmith") else torch_default_env())
            runs.setdefault(side, []).append(json.loads(out.read_text()) | {"seed": seed,
                                                                            "wall_s": time.perf_counter() - started})
    results = {side: mean_over_seeds(r) for side, r in runs.items()}
    out = workdir / "inference.json"
    subprocess.run([sys.executable, __file__, "--side", "inference", "--run-dir", runs["tunesmith"][0]["run_dir"],
                    "--workdir", str(workdir), "--train-csv", str(train_csv), "--test-csv", str(test_csv),
                    "--out", str(out)], check=True, env=torch_default_env())
    inference = json.loads(out.read_text())

    def mfu(samples_per_s: float, tokens: int, n: int, factor: int, precision: str) -> float:
        return factor * n_params * (tokens / n) * samples_per_s / peaks[precision]

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch
    if torch.cuda.is_available():
        cpu = f"{torch.cuda.get_device_name()} (torch {torch.__version__}), host {cpu}"
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores; train {n_train} rows, "
          f"test {len(test_texts)} rows (film-disjoint); matmul peak "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
          + f"; THP_MEM_ALLOC_ENABLE tunesmith {os.environ.get('THP_MEM_ALLOC_ENABLE')}, "
            f"Trainer/inference {USER_THP or '0'}\n")
    print("| side | seeds | precision | train samples/s | eval samples/s | train MFU | test accuracy | macro F1 "
          "| peak RSS MB | peak GPU MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    spread = lambda r, key: f" ± {r[key + '_std']:.4f}" if len(r["seeds"]) > 1 else ""  # noqa: E731
    for side, r in results.items():
        print(f"| {side} | {' '.join(map(str, r['seeds']))} | {r['precision']} | {r['train_samples_per_second']:.1f} | "
              f"{r['eval_samples_per_second']:.1f} | "
              f"{mfu(r['train_samples_per_second'], train_tokens, n_train, 6, r['precision']):.1%} | "
              f"{r['accuracy']:.4f}{spread(r, 'accuracy')} | {r['macro_f1']:.4f}{spread(r, 'macro_f1')} | "
              f"{r['peak_rss_mb']:.0f} | {'-' if r.get('peak_gpu_mb') is None else round(r['peak_gpu_mb'])} |")
    if len(args.seeds) > 1:
        print("\nper seed (test accuracy / macro F1 / train samples/s):")
        for side, rs in runs.items():
            print(f"  {side}: " + "; ".join(f"seed {r['seed']}: {r['accuracy']:.4f} / {r['macro_f1']:.4f} / "
                                           f"{r['train_samples_per_second']:.1f}" for r in rs))
    ts = results["tunesmith"]
    hf = {k: v for k, v in results.items() if k.startswith("hf_")}
    fastest = max(hf, key=lambda k: hf[k]["train_samples_per_second"])  # the Trainer's best setting, as measured
    best = hf[fastest]
    print(f"\ntrain speed: tunesmith / {fastest} (fastest Trainer setting here) = "
          f"{ts['train_samples_per_second'] / best['train_samples_per_second']:.2f}x; "
          + ", ".join(f"tunesmith / {k} = {ts['train_samples_per_second'] / v['train_samples_per_second']:.2f}x"
                      for k, v in hf.items() if k != fastest))
    fastest_eval = max(hf, key=lambda k: hf[k]["eval_samples_per_second"])
    print(f"eval speed:  tunesmith / {fastest_eval} = "
          f"{ts['eval_samples_per_second'] / hf[fastest_eval]['eval_samples_per_second']:.2f}x")
    print(f"accuracy:    tunesmith - {fastest} = {100 * (ts['accuracy'] - best['accuracy']):+.2f} points")
    print(f"peak RSS:    tunesmith / {fastest} = {ts['peak_rss_mb'] / best['peak_rss_mb']:.2f}x")
    if ts.get("peak_gpu_mb") and best.get("peak_gpu_mb"):
        print(f"peak GPU:    tunesmith / {fastest} = {ts['peak_gpu_mb'] / best['peak_gpu_mb']:.2f}x")
    print(f"inference:   HF pipeline {inference['hf_pipeline_samples_per_second']:.1f} samples/s, tunesmith predict "
          f"{inference['tunesmith_predict_samples_per_second']:.1f} samples/s = "
          f"{inference['tunesmith_predict_samples_per_second'] / inference['hf_pipeline_samples_per_second']:.2f}x "
          f"(medians of {len(inference['hf_pipeline_rounds'])} alternating passes; pipeline "
          + "/".join(f"{x:.1f}" for x in inference["hf_pipeline_rounds"]) + ", predict "
          + "/".join(f"{x:.1f}" for x in inference["tunesmith_predict_rounds"]) + ")")


if __name__ == "__main__":
    main()
