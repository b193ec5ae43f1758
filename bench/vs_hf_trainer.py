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
  tunesmith   tunesmith's defaults, with the model's own dropout as the Trainer (train.dropout: model)
  (tunesmith_dropout_auto, with --also-dropout-auto: tunesmith's default train.dropout, none at 1 epoch)
  (tunesmith_warm, with --also-warm-worker: the tunesmith side's commands by the `tunesmith` console script,
   handed to a warm worker started once before the first side (`tunesmith worker start`); its peak RSS is
   the worker's child's, not this script's child's, and is not measured: "-")
Then inference: HF pipeline("text-classification", batch_size=32) vs tunesmith predict on the test texts,
3 alternating passes each in one process (medians).

End to end, the way a user runs it: every side is its own process, timed by this script from its start to
its exit, with the test predictions written to a file. The Trainer side is a script (tokenize, train,
trainer.predict, a CSV of labels and probabilities; it never imports tunesmith); tunesmith's side is the
command line, `tunesmith train CONFIG` with data.test (it writes test_predictions.csv), then, timed apart,
`tunesmith predict RUN --input test.csv --output preds.csv`. tunesmith's fixed costs come from the run's
metrics.json (`timing`, written by the run itself). With --before-src another checkout's src/ (e.g. the
main branch) runs the same command in the same script, for a before / after.
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


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a process to its end: (seconds from its start to its exit, its peak RSS in MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> str:
    """The CPU flags that decide the speed of fp32 and bf16 matmuls here."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return " ".join(f for f in CPU_FLAGS if f in flags) or "unknown"


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


def prepare(workdir: Path, train_rows: int | None, test_rows: int | None = None) -> tuple[Path, Path]:
    from tunesmith import catalog
    folder = catalog.dataset_path("rotten_tomatoes")
    train = pd.read_csv(folder / "train.csv")
    if train_rows:
        train = train.sample(train_rows, random_state=SAMPLE_SEED)
    train.to_csv(workdir / "train.csv", index=False)
    if not test_rows:
        return workdir / "train.csv", folder / "test.csv"
    pd.read_csv(folder / "test.csv").sample(test_rows, random_state=SAMPLE_SEED).to_csv(workdir / "test.csv", index=False)
    return workdir / "train.csv", workdir / "test.csv"


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


def run_hf(train_csv: Path, test_csv: Path, best: bool, workdir: Path, seed: int, path: str, bf16_fast: bool,
           spawned: float, pad_multiple: int | None = None) -> dict:
    """The Trainer as its user runs it (nothing of tunesmith imported): `spawned` is time.time() when the
    parent started this process, so each phase is seconds since the process started."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)
    from transformers.utils import logging

    marks = {"imports": time.time() - spawned}
    logging.set_verbosity_error()
    train, test = pd.read_csv(train_csv), pd.read_csv(test_csv)
    names = sorted(set(train["label"]))
    tok = AutoTokenizer.from_pretrained(path)

    def encode(df):
        enc = tok(df["text"].tolist(), truncation=True, max_length=MAX_LEN)
        return [{"input_ids": ids, "attention_mask": m, "labels": names.index(y)}
                for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], df["label"])]

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    bf16 = best and bf16_fast
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
    marks["first_step"] = time.time() - spawned  # setup done; the first step follows at once
    out = trainer.train()
    marks["trained"] = time.time() - spawned
    pred = trainer.predict(encode(test))
    y_pred = pred.predictions.argmax(-1)
    probs = torch.softmax(torch.from_numpy(pred.predictions).float(), -1).numpy()
    pd.DataFrame({"text": test["text"], "label": [names[i] for i in y_pred],
                  **{f"p_{n}": probs[:, i] for i, n in enumerate(names)}}).to_csv(workdir / "hf_predictions.csv",
                                                                                   index=False)
    marks["predictions_written"] = time.time() - spawned
    return {"marks": marks, "train_seconds": out.metrics["train_runtime"],
            "train_samples_per_second": out.metrics["train_samples_per_second"],
            "eval_samples_per_second": pred.metrics["test_samples_per_second"],
            "accuracy": accuracy_score(pred.label_ids, y_pred),
            "macro_f1": f1_score(pred.label_ids, y_pred, average="macro"),
            "precision": "bf16" if bf16 else "fp32", "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": peak_gpu_mb()}


def tunesmith_config(train_csv: Path, test_csv: Path, workdir: Path, seed: int, precision: str, name: str,
                     src: Path, same_dropout: bool = True) -> Path:
    cfg = {"model": {"name": "minilm-l6", "max_length": MAX_LEN},
           "data": {"train": str(train_csv), "test": str(test_csv), "validation_fraction": 0},
           "train": {"epochs": 1, "batch_size": BATCH, "lr": LR, "weight_decay": WD, "warmup_ratio": WARMUP,
                     "seed": seed, "precision": precision},
           "output": {"dir": str(workdir / "runs"), "name": name}}
    # the Trainer trains with the model's dropout; train.dropout: auto would drop it for 1 epoch (a checkout from
    # before 2026-12-03, --before-src, has no such key and always kept it)
    if same_dropout and "dropout:" in (src / "tunesmith" / "config.py").read_text():
        cfg["train"]["dropout"] = "model"
    path = workdir / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def warm_worker_env(workdir: Path, src: Path) -> dict[str, str]:
    """The environment of the warm side's worker and commands (the worker serves only this environment)."""
    return os.environ | {"PYTHONPATH": str(src), "TUNESMITH_WORKER_DIR": str(workdir / "w")}


def run_tunesmith_cli(train_csv: Path, test_csv: Path, workdir: Path, seed: int, precision: str, name: str,
                      src: Path, same_dropout: bool = True, warm: bool = False) -> dict:
    """`tunesmith train CONFIG` then `tunesmith predict`, each a process timed from its start to its exit,
    with tunesmith from `src` (this checkout, or --before-src); warm: by the console script, which hands them
    to the worker of warm_worker_env."""
    config = tunesmith_config(train_csv, test_csv, workdir, seed, precision, name, src, same_dropout)
    env = warm_worker_env(workdir, src) if warm else os.environ | {"PYTHONPATH": str(src)}
    cli = [str(Path(sys.executable).parent / "tunesmith")] if warm else [sys.executable, "-m", "tunesmith.cli"]
    run_dir = workdir / "runs" / name
    train_wall, rss = run_timed(cli + ["train", str(config)], env)
    predict_wall, _ = run_timed(cli + ["predict", str(run_dir), "--input", str(test_csv),
                                       "--output", str(workdir / f"{name}.csv")], env)
    summary = json.loads((run_dir / "metrics.json").read_text())
    if summary.get("warm_worker", False) != warm:
        raise SystemExit(f"{name}: warm_worker is {summary.get('warm_worker')} in its metrics.json, expected {warm}")
    rss = None if warm else rss
    return {"train_samples_per_second": summary["train"]["samples_per_second"],
            "eval_samples_per_second": summary["test_samples_per_second"],
            "accuracy": summary["test"]["accuracy"], "macro_f1": summary["test"]["macro_f1"],
            "precision": summary["train"]["precision"], "peak_rss_mb": rss, "peak_gpu_mb": None,
            "run_dir": str(run_dir), "train_seconds": summary["train"]["seconds"], "timing": summary.get("timing"),
            "wall_s": train_wall, "predict_wall_s": predict_wall}


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
    row = dict(runs[0], seeds=[r["seed"] for r in runs], first_seed_wall_s=runs[0].get("wall_s"))  # for its timing
    for key in ("train_samples_per_second", "eval_samples_per_second", "accuracy", "macro_f1", "wall_s",
                "train_seconds", "predict_wall_s"):
        if any(r.get(key) is None for r in runs):
            continue
        values = [float(r[key]) for r in runs]
        row[key], row[key + "_std"] = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    for key in ("peak_rss_mb", "peak_gpu_mb"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = max(values) if values else None
    return row


def child(args) -> None:
    workdir = Path(args.workdir)
    train_csv, test_csv = Path(args.train_csv), Path(args.test_csv)
    if args.side == "inference":
        res = run_inference(Path(args.run_dir), test_csv)
    else:
        res = run_hf(train_csv, test_csv, args.side != "hf_default", workdir, int(args.seed), args.model_path,
                     args.bf16_fast == "1", float(args.spawned), 16 if args.side == "hf_best_pad16" else None)
    Path(args.out).write_text(json.dumps(res))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train-rows", type=int, default=None, help="sample this many training rows (default: all)")
    parser.add_argument("--test-rows", type=int, default=None, help="sample this many test rows (default: all)")
    parser.add_argument("--also-precision", nargs="*", default=[], choices=["fp32", "bf16"],
                        help="also run tunesmith with this train.precision (beside its default, auto)")
    parser.add_argument("--also-dropout-auto", action="store_true",
                        help="also run tunesmith with its default train.dropout (auto: none at 1 epoch) instead of the "
                             "model's own, which the Trainer keeps: less work, not the same hyperparameters")
    parser.add_argument("--also-warm-worker", action="store_true",
                        help="also run the tunesmith side's commands through a warm worker (tunesmith worker start)")
    parser.add_argument("--hf-pad16", action="store_true",
                        help="also run the Trainer's best setting with its collator padding to multiples of 16")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds (default: 0); with several, the table shows means over seeds")
    parser.add_argument("--no-inference", action="store_true", help="skip the pipeline vs predict passes")
    parser.add_argument("--save", type=Path, help="also write every side's raw results (JSON) here")
    parser.add_argument("--no-hf-default", action="store_true",
                        help="skip the Trainer's default setting (slow; the ratios are against its best anyway)")
    parser.add_argument("--before-src", type=Path,
                        help="also run tunesmith from this src/ folder (e.g. the main branch's) for a before/after")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    for hidden in ("--workdir", "--train-csv", "--test-csv", "--out", "--run-dir", "--seed", "--model-path",
                   "--bf16-fast", "--spawned"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:  # ~350 MB per run: never left behind
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, workdir: Path) -> None:
    """Train every side on the same rows inside `workdir`, then print the table and the ratios."""
    train_csv, test_csv = prepare(workdir, args.train_rows, args.test_rows)
    n_train = len(pd.read_csv(train_csv))
    test_texts = pd.read_csv(test_csv)["text"].tolist()
    train_tokens = real_tokens(pd.read_csv(train_csv)["text"].tolist())
    n_params = non_embedding_params()
    from tunesmith.inference import choose_precision
    peaks = {"fp32": matmul_peak("float32")}
    if choose_precision("auto") == "bf16":  # bf16 matmul without hardware support takes minutes: skip it
        peaks["bf16"] = matmul_peak("bfloat16")

    import tunesmith
    from tunesmith import catalog
    model_path, bf16_fast = str(catalog.model_path("minilm-l6")), choose_precision("auto") == "bf16"
    src = Path(tunesmith.__file__).resolve().parents[1]
    runs: dict[str, list[dict]] = {}
    sides = ["hf_default"] * (not args.no_hf_default) + ["hf_best"] + ["hf_best_pad16"] * args.hf_pad16 \
        + ["tunesmith"] + [f"tunesmith_{p}" for p in args.also_precision] + ["tunesmith_dropout_auto"] * \
        args.also_dropout_auto + ["tunesmith_warm"] * args.also_warm_worker + ["tunesmith_before"] * bool(args.before_src)
    console_script = [str(Path(sys.executable).parent / "tunesmith")]
    if args.also_warm_worker:
        started = subprocess.run(console_script + ["worker", "start", "--idle-minutes", "120"], check=True, text=True,
                                 env=warm_worker_env(workdir, src), capture_output=True)
        print(started.stderr.strip(), file=sys.stderr)
    try:
        runs = run_sides(args, sides, workdir, train_csv, test_csv, src, model_path, bf16_fast)
    finally:
        if args.also_warm_worker:
            subprocess.run(console_script + ["worker", "stop"], env=warm_worker_env(workdir, src), capture_output=True)
    if args.save:  # the raw results, for a table made again later
        args.save.write_text(json.dumps(runs, indent=1))
    results = {side: mean_over_seeds(r) for side, r in runs.items()}
    inference = None
    if not args.no_inference:
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
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {cpu} (flags: {cpu_flags()}), {os.cpu_count()} cores, "
          f"load average at the end {os.getloadavg()[0]:.1f}; train {n_train} rows, "
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
              f"{'-' if r['peak_rss_mb'] is None else round(r['peak_rss_mb'])} | "
              f"{'-' if r.get('peak_gpu_mb') is None else round(r['peak_gpu_mb'])} |")
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
    for side in (s for s in results if s.startswith("tunesmith_")):  # the other tunesmith settings
        r = results[side]
        print(f"             {side} / {fastest} = "
              f"{r['train_samples_per_second'] / best['train_samples_per_second']:.2f}x, accuracy "
              f"{100 * (r['accuracy'] - best['accuracy']):+.2f} points")
    fastest_eval = max(hf, key=lambda k: hf[k]["eval_samples_per_second"])
    print(f"eval speed:  tunesmith / {fastest_eval} = "
          f"{ts['eval_samples_per_second'] / hf[fastest_eval]['eval_samples_per_second']:.2f}x")
    print(f"accuracy:    tunesmith - {fastest} = {100 * (ts['accuracy'] - best['accuracy']):+.2f} points")
    print(f"peak RSS:    tunesmith / {fastest} = {ts['peak_rss_mb'] / best['peak_rss_mb']:.2f}x")
    if ts.get("peak_gpu_mb") and best.get("peak_gpu_mb"):
        print(f"peak GPU:    tunesmith / {fastest} = {ts['peak_gpu_mb'] / best['peak_gpu_mb']:.2f}x")
    print_end_to_end(results, fastest)
    if inference is None:
        return
    print(f"inference:   HF pipeline {inference['hf_pipeline_samples_per_second']:.1f} samples/s, tunesmith predict "
          f"{inference['tunesmith_predict_samples_per_second']:.1f} samples/s = "
          f"{inference['tunesmith_predict_samples_per_second'] / inference['hf_pipeline_samples_per_second']:.2f}x "
          f"(medians of {len(inference['hf_pipeline_rounds'])} alternating passes; pipeline "
          + "/".join(f"{x:.1f}" for x in inference["hf_pipeline_rounds"]) + ", predict "
          + "/".join(f"{x:.1f}" for x in inference["tunesmith_predict_rounds"]) + ")")


def run_sides(args: argparse.Namespace, sides: list[str], workdir: Path, train_csv: Path, test_csv: Path, src: Path,
              model_path: str, bf16_fast: bool) -> dict[str, list[dict]]:
    """Every side once per seed, one after the other: {side: [result per seed]}."""
    runs: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for side in sides:
            if side == "hf_default" and seed != args.seeds[0]:
                continue
            print(f"running {side}, seed {seed} ...", file=sys.stderr, flush=True)
            if side.startswith("tunesmith"):
                precision = side.partition("_")[2] if side.endswith(("fp32", "bf16")) else "auto"
                res = run_tunesmith_cli(train_csv, test_csv, workdir, seed, precision, f"{side}-seed{seed}",
                                        args.before_src if side == "tunesmith_before" else src,
                                        same_dropout=side != "tunesmith_dropout_auto", warm=side == "tunesmith_warm")
            else:
                out = workdir / f"{side}-seed{seed}.json"
                wall, _ = run_timed([sys.executable, __file__, "--side", side, "--seed", str(seed), "--workdir",
                                     str(workdir), "--train-csv", str(train_csv), "--test-csv", str(test_csv),
                                     "--out", str(out), "--model-path", model_path, "--bf16-fast", str(int(bf16_fast)),
                                     "--spawned", repr(time.time())], torch_default_env())
                res = json.loads(out.read_text()) | {"wall_s": wall}
            runs.setdefault(side, []).append(res | {"seed": seed})
    return runs


def print_end_to_end(results: dict[str, dict], fastest: str) -> None:
    """Process start to test predictions written, per side; where tunesmith's seconds outside training go."""
    print("\nend to end, each side its own process (start -> test predictions written -> exit):\n")
    print("| side | precision | wall s | training s | outside training s | then `tunesmith predict` s | test accuracy |")
    print("|---|---|---|---|---|---|---|")
    for side, r in results.items():
        predict = f"{r['predict_wall_s']:.1f}" if r.get("predict_wall_s") is not None else "-"
        print(f"| {side} | {r['precision']} | {r['wall_s']:.1f} | {r['train_seconds']:.1f} | "
              f"{r['wall_s'] - r['train_seconds']:.1f} | {predict} | {r['accuracy']:.4f} |")
    hf_wall = results[fastest]["wall_s"]
    for side in (s for s in results if s.startswith("tunesmith")):
        r = results[side]
        print(f"\nend to end: {fastest} / {side} = {hf_wall / r['wall_s']:.2f}x (train with data.test); with a "
              f"separate predict process after it {hf_wall / (r['wall_s'] + r['predict_wall_s']):.2f}x")
        timing = r.get("timing")
        if timing:  # written by the run (metrics.json): seconds, this process
            setup = timing.get("setup", timing["first_step"])  # older runs: no "setup"
            before = {"before train() (Python, imports)": timing["before_train"], "read data": timing["read_data"],
                      "load model": timing["load_model"], "encode": timing["encode"],
                      "rest of setup": setup - timing["read_data"] - timing["load_model"] - timing["encode"],
                      "accelerator + first step": timing["first_step"] - setup}
            after = {"checkpoints": timing.get("checkpoints", 0.0), "test (encode, outputs, predictions file)":
                     timing.get("test", 0.0), "exit after metrics.json": r["first_seed_wall_s"] - timing["process_at_finish"]}
            print(f"{side} fixed costs, seconds (seed {r['seeds'][0]}): start-up to the end of the first step "
                  f"{timing['before_train'] + timing['first_step']:.1f} = "
                  + " + ".join(f"{k} {v:.1f}" for k, v in before.items()) + "; after training: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in after.items()))
    marks = results[fastest].get("marks")
    if marks:
        print(f"{fastest} marks, seconds since its process started: " + ", ".join(f"{k} {v:.1f}" for k, v in marks.items()))


if __name__ == "__main__":
    main()
