"""Shared fixtures: a tiny random BERT written with save_pretrained (so the real loading code runs)
and small synthetic datasets whose labels a tiny model can learn in seconds."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest workers (pytest-xdist): each gets one thread for torch, in process and in the CLI
# processes it starts. Two workers of two threads each on a 2-core machine run far slower than one each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

POSITIVE = ["good", "great", "excellent", "wonderful", "fun", "superb"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor"]
NEUTRAL = ["the", "movie", "film", "was", "is", "a", "plot", "story", "acting", "very", "really", "quite",
           "and", "but", "with", "music", "scenes", "actors", "of", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL + ["!", ".", ",", "##s", "##ly", "neutral"]


def save_tiny_bert(folder: Path, vocab: list[str], model_class=None) -> Path:
    """A 2-layer, 32-wide random BERT (BertModel unless model_class says otherwise) and a WordPiece
    tokenizer over `vocab`, written with save_pretrained into folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    (model_class or BertModel)(config).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), VOCAB)


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Texts with one or two sentiment words among neutral filler; the label follows the sentiment."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(NEUTRAL, k=rng.randint(3, 14))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label, "film": f"film{i % 37}"})
    return rows


@pytest.fixture
def sentiment_csv(tmp_path) -> tuple[Path, Path]:
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    pd.DataFrame(sentiment_rows(400, seed=1)).to_csv(train, index=False)
    pd.DataFrame(sentiment_rows(120, seed=2)).to_csv(test, index=False)
    return train, test


def tiny_config(model_dir: Path, train: Path, test: Path | None, out: Path, **train_overrides) -> dict:
    train_cfg = {"epochs": 3, "batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.0, "seed": 0,
                 "precision": "fp32"}
    train_cfg.update(train_overrides)
    data = {"train": str(train), "validation_fraction": 0.2}
    if test is not None:
        data["test"] = str(test)
    # report: false keeps the suite's many tiny runs at their old cost; test_report.py checks the default (on)
    return {"model": {"name": str(model_dir), "max_length": 32}, "data": data, "train": train_cfg,
            "output": {"dir": str(out)}, "report": False}


@pytest.fixture
def cli_env(tmp_path) -> dict:
    env = dict(os.environ)
    env["TUNESMITH_CACHE"] = str(tmp_path / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


TUNESMITH = [sys.executable, "-m", "tunesmith.cli"]


def sigint_as_at_a_terminal() -> None:
    """preexec_fn of a CLI process a test sends SIGINT: its default disposition, as for a command typed at a
    terminal, even where the tests themselves were started ignoring it (a script's `make test &`), which
    the process would otherwise inherit and keep."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_after_first_checkpoint(config: Path, run_dir: Path, env: dict, cwd: Path) -> None:
    """`tunesmith train config` in a real process, SIGKILLed as soon as its first checkpoint is complete
    (or after 120 s, or once it exits)."""
    proc = subprocess.Popen(TUNESMITH + ["train", str(config)], env=env, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(run_dir.glob("checkpoints/step-*/state.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def encode_cfg(max_length: int, stride: int | None = None, task: str = "text_classification"):
    """A config whose model reads max_length tokens (and chunks long texts with `stride`), for a task's
    encode(); built unvalidated so tests may use lengths below the config's minimum."""
    from tunesmith.config import load_config

    cfg = load_config({"task": task, "data": {"train": "x"}})
    model = {"max_length": max_length} if stride is None else {"max_length": max_length, "long_text": "chunk",
                                                               "stride": stride}
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=model)})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """get(task name) -> (run folder, case): one small run per registered task on test_tasks.CASES' tiny model
    and data, trained once per session (export and serve tests share them)."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            import tunesmith
            from test_tasks import CASES
            root = tmp_path_factory.mktemp(name)
            case = CASES[name](root)
            cfg = {**case["config"], "data": {"train": str(case["train"]), "test": str(case["test"]),
                                              "validation_fraction": 0.2},
                   "output": {"dir": str(root / "runs"), "name": "run"}}
            cfg["train"] = {"epochs": 2, **cfg["train"]}  # unless the case needs more
            made[name] = (tunesmith.train(cfg).run_dir, case)
        return made[name]
    return get
