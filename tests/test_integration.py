"""Real MiniLM-L6 on real Rotten Tomatoes data (fetched from packages into the cache): the model
must actually learn, well above the majority class, on films it never saw."""

import pandas as pd
import pytest

import tunesmith
from tunesmith import catalog

pytestmark = pytest.mark.integration


def test_minilm_learns_rotten_tomatoes_subset(tmp_path):
    folder = catalog.dataset_path("rotten_tomatoes")
    train = pd.read_csv(folder / "train.csv").sample(1200, random_state=0)
    test = pd.read_csv(folder / "test.csv").sample(500, random_state=0)
    assert not set(train["film"]) & set(test["film"]), "test films must be unseen"
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    majority = test["label"].value_counts(normalize=True).max()

    result = tunesmith.train({
        "model": {"name": "minilm-l6", "max_length": 64},
        "data": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv"),
                 "validation_fraction": 0},
        "train": {"epochs": 2, "batch_size": 32, "lr": 1e-4, "seed": 0},
        "output": {"dir": str(tmp_path / "runs")},
    })
    assert result.metrics["accuracy"] > majority + 0.12, (result.metrics["accuracy"], majority)
    assert result.metrics["macro_f1"] > 0.65
