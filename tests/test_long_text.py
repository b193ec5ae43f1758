"""Long texts in classification: windows with a stride, per-document aggregation of window logits,
per-document evaluation, and the run summary saying how long texts were handled.
(NER window stitching is tested in test_token_classification.py.)"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tunesmith
from conftest import NEGATIVE, NEUTRAL, POSITIVE, TUNESMITH, encode_cfg, tiny_config
from tunesmith.data import Table
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.tasks import text_classification as tcls


def end_signal_rows(n: int, seed: int) -> list[dict]:
    """About 30 neutral words, then the one word that gives the label: only the end tells."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(NEUTRAL, k=rng.randint(26, 32)) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def end_signal_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("long")
    train, test = folder / "train.csv", folder / "test.csv"
    pd.DataFrame(end_signal_rows(240, 1)).to_csv(train, index=False)
    pd.DataFrame(end_signal_rows(80, 2)).to_csv(test, index=False)
    return train, test


def long_config(tiny_model_dir, files, out, long_text: str, **model) -> dict:
    cfg = tiny_config(tiny_model_dir, *files, out, epochs=12)
    cfg["model"].update(max_length=16, long_text=long_text, stride=4, **model)
    return cfg


def test_windows_share_stride_tokens_and_cover_the_text(tiny_model_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = end_signal_rows(3, 5) + [{"text": "good film", "label": "pos"}]
    table = Table(pd.DataFrame(rows), Path("x.csv"), list(range(2, 6)))
    examples = tcls.Examples(table, [r["text"] for r in rows], None, np.asarray([1, 0, 1, 1]))
    enc = tcls.encode(tokenizer, examples, encode_cfg(16, 4))
    full = tokenizer([r["text"] for r in rows])["input_ids"]
    assert enc.num_examples == 4 and enc.truncated == 3
    for doc in range(4):
        windows = [f for f, d in zip(enc.features, enc.doc_index) if d == doc]
        assert all(len(w["input_ids"]) <= 16 for w in windows)
        assert all(w["labels"] == examples.targets[doc] for w in windows)  # every window carries the label
        body = windows[0]["input_ids"][1:-1]
        for prev, w in zip(windows, windows[1:]):
            assert w["input_ids"][1:5] == prev["input_ids"][-5:-1]  # 4 tokens shared with the window before
            body += w["input_ids"][5:-1]
        assert body == full[doc][1:-1]  # nothing lost, nothing repeated once the overlaps are removed
    # without chunking the same texts are cut to one input each and counted
    cut = tcls.encode(tokenizer, examples, encode_cfg(16))
    assert (len(cut.features), cut.truncated, cut.doc_index) == (4, 3, None)


def test_merge_windows_mean_and_max():
    enc = tcls.Encoded([{}] * 4, [0] * 4, 1, doc_index=[0, 0, 0, 1], num_examples=2)
    logits = np.asarray([[1.0, 0.0], [3.0, -2.0], [-1.0, 5.0], [0.5, 0.25]], dtype=np.float32)
    np.testing.assert_allclose(tcls.merge_windows(logits, enc, "mean"), [[1.0, 1.0], [0.5, 0.25]])
    np.testing.assert_allclose(tcls.merge_windows(logits, enc, "max"), [[3.0, 5.0], [0.5, 0.25]])
    plain = tcls.Encoded([{}] * 2, [0] * 2, 0)
    assert tcls.merge_windows(logits[:2], plain) is not None and tcls.merge_windows(logits[:2], plain).shape == (2, 2)


@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_chunking_reads_the_end_that_truncation_cuts_off(aggregation, tiny_model_dir, end_signal_files, tmp_path):
    """The label is only in the last word of ~40: truncating to 16 tokens is a coin toss, windows learn it."""
    cut = tunesmith.train(long_config(tiny_model_dir, end_signal_files, tmp_path / "cut", "truncate"))
    chunked = tunesmith.train(long_config(tiny_model_dir, end_signal_files, tmp_path / "chunk", "chunk",
                                          chunk_aggregation=aggregation))
    assert cut.metrics["accuracy"] < 0.7, cut.metrics
    assert chunked.metrics["accuracy"] >= 0.85, chunked.metrics
    summary = json.loads((chunked.run_dir / "metrics.json").read_text())
    assert summary["data"]["long_text"] == "chunk" and summary["data"]["long_train"] == summary["data"]["train"]
    assert summary["data"]["train_windows"] >= 3 * summary["data"]["train"]
    # evaluation and predictions are per document, not per window
    frame = pd.read_csv(chunked.run_dir / "test_predictions.csv")
    assert len(frame) == 80 and (frame["predicted_label"] == frame["label"]).mean() == chunked.metrics["accuracy"]
    again = tunesmith.evaluate(chunked.run_dir, end_signal_files[1], precision="fp32")
    assert again["accuracy"] == chunked.metrics["accuracy"]


def test_the_cli_says_how_long_texts_were_handled(tiny_model_dir, end_signal_files, tmp_path, cli_env):
    config = tmp_path / "long.yaml"
    import yaml
    config.write_text(yaml.safe_dump(long_config(tiny_model_dir, end_signal_files, tmp_path / "runs", "chunk")
                                     | {"output": {"dir": str(tmp_path / "runs"), "name": "r"}}))
    proc = subprocess.run(TUNESMITH + ["train", str(config), "--train.epochs", "1"], capture_output=True,
                          text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "longer than 16 tokens, split into" in proc.stderr and "overlapping windows (stride 4)" in proc.stderr
    text = end_signal_rows(1, 9)[0]["text"]
    proc = subprocess.run(TUNESMITH + ["predict", str(tmp_path / "runs" / "r"), "--text", text, "--text", "good"],
                          capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 2  # one prediction per text, however many windows
    assert "1 longer than 16 tokens, split into" in proc.stderr


def test_truncation_is_reported_too(tiny_model_dir, end_signal_files, tmp_path, capfd):
    tunesmith.train(long_config(tiny_model_dir, end_signal_files, tmp_path / "runs", "truncate"), {"train.max_steps": 1})
    assert "longer than 16 tokens, truncated; model.long_text: chunk keeps all of them" in capfd.readouterr().err


@pytest.mark.parametrize("model,message", [
    ({"long_text": "chunk", "stride": 10, "max_length": 16}, "model.stride: 10 is too large for max_length 16"),
    ({"long_text": "split"}, "model.long_text: Input should be 'truncate' or 'chunk'"),
    ({"chunk_aggregation": "median"}, "model.chunk_aggregation: Input should be 'mean' or 'max'"),
])
def test_bad_chunk_settings(model, message):
    with pytest.raises(TunesmithError, match=message.replace("(", r"\(")):
        load_config({"model": model, "data": {"train": "x.csv"}})


def test_bad_chunk_setting_through_the_cli(tmp_path, cli_env):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  long_text: chunk\n  max_length: 16\n  stride: 12\ndata:\n  train: x.csv\n")
    proc = subprocess.run(TUNESMITH + ["train", str(config)], capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {config}, line 4: model.stride: 12 is too large for max_length "
                                                "16: windows must move forward (use at most 8) (got 12)"]
