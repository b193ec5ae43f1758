"""Cross-validation on a tiny random BERT: group-disjoint folds, mean ± std, complete out-of-fold
predictions, the fold ensemble, and bad input."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

import tunesmith
from conftest import sentiment_rows, tiny_config
from tunesmith.cli import main
from tunesmith.cv import fold_indices
from tunesmith.inference import ensemble_logits
from tunesmith.tasks import text_classification
from tunesmith.tasks.classes import LabelSpace
from tunesmith.errors import TunesmithError


def _write(tmp_path, model_dir, rows, test_rows=None, **data):
    train = tmp_path / "train.csv"
    pd.DataFrame(rows).to_csv(train, index=False)
    test = None
    if test_rows is not None:
        test = tmp_path / "test.csv"
        pd.DataFrame(test_rows).to_csv(test, index=False)
    cfg = tiny_config(model_dir, train, test, tmp_path / "runs", epochs=1, batch_size=16)
    cfg["data"].update(data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_cv_by_group_mean_std_oof_and_ensemble(tiny_model_dir, tmp_path, capsys):
    rows = sentiment_rows(160, seed=3)  # 37 films
    cfg = _write(tmp_path, tiny_model_dir, rows, sentiment_rows(40, seed=4), group_column="film")
    code = main(["cv", str(cfg), "--folds", "4", "--keep-models", "--output.name=cv"])
    out, err = capsys.readouterr()
    assert code == 0, err
    cv_dir = tmp_path / "runs" / "cv"
    info = json.loads((cv_dir / "cv.json").read_text())
    assert info["folds_run"] == 4 and info["grouped"] and len(info["per_fold"]) == 4

    # every training row exactly once, and every film in exactly one fold
    oof = pd.read_csv(cv_dir / "oof_predictions.csv")
    assert oof["row"].tolist() == list(range(1, 161))
    assert oof["text"].tolist() == [r["text"] for r in rows]
    assert (oof.groupby("film")["fold"].nunique() == 1).all()
    assert sorted(oof["fold"].unique()) == [1, 2, 3, 4]
    assert np.allclose(oof[["prob_neg", "prob_pos"]].sum(axis=1), 1.0, atol=1e-4)
    for fold in range(1, 5):  # the fold's run saw none of its held-out films, not even for validation
        held = (oof["fold"] == fold).sum()
        summary = json.loads((cv_dir / f"fold-{fold}" / "metrics.json").read_text())
        assert summary["data"]["train"] + summary["data"]["validation"] == 160 - held
        assert summary["data"]["test"] == held
        fold_acc = (oof[oof["fold"] == fold]["predicted_label"] == oof[oof["fold"] == fold]["label"]).mean()
        assert info["per_fold"][fold - 1]["accuracy"] == pytest.approx(fold_acc)

    # mean ± std (sample std) of every metric printed, matching the per-fold figures
    for metric in ("accuracy", "macro_f1"):
        values = [f[metric] for f in info["per_fold"]]
        line = next(x for x in out.splitlines() if x.startswith(metric + " "))
        assert f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" in line
    assert info["pooled_out_of_fold"]["accuracy"] == pytest.approx(
        (oof["predicted_label"] == oof["label"]).mean())

    # the cv folder predicts as the ensemble: averaged probabilities of the fold models
    assert info["test_ensemble"] is not None and (cv_dir / "test_predictions.csv").is_file()
    preds = tmp_path / "ens.csv"
    assert main(["predict", str(cv_dir), "--input", str(tmp_path / "test.csv"), "--output", str(preds)]) == 0
    ens = pd.read_csv(preds)
    members = [tunesmith.predict(cv_dir / f"fold-{i}", tmp_path / "test.csv") for i in range(1, 5)]
    expected = np.mean([m[["prob_neg", "prob_pos"]].to_numpy() for m in members], axis=0)
    assert np.allclose(ens[["prob_neg", "prob_pos"]].to_numpy(), expected, atol=2e-5)
    assert tunesmith.evaluate(cv_dir, tmp_path / "test.csv")["accuracy"] == pytest.approx(
        info["test_ensemble"]["accuracy"])


def test_python_cv_stratified_without_groups_keeps_no_models(tiny_model_dir, tmp_path):
    rows = sentiment_rows(90, seed=5)
    rows = rows + [{"text": "good good fun", "label": "meh", "film": "x"} for _ in range(6)]  # a rare class
    cfg = _write(tmp_path, tiny_model_dir, rows, validation_fraction=0.0)
    result = tunesmith.cv(cfg, folds=3)
    oof = pd.read_csv(result.cv_dir / "oof_predictions.csv")
    counts = oof.groupby("fold")["label"].value_counts().unstack()
    assert (counts["meh"] == 2).all() and (counts["pos"] == 15).all()  # every fold holds out 1/3 of each class
    assert not any((result.cv_dir / f"fold-{i}" / "model").exists() for i in (1, 2, 3))
    assert json.loads((result.cv_dir / "cv.json").read_text())["checkpoint_selection"] == "last step"
    assert set(result.mean) == set(result.std) and "macro_f1" in result.mean
    with pytest.raises(TunesmithError, match="without fold models"):
        tunesmith.predict(result.cv_dir, tmp_path / "train.csv")


class _Rows:
    def __init__(self, targets, groups=None, names=()):
        self.targets, self.groups, self.label_names = np.asarray(targets), groups, list(names)

    def __len__(self):
        return len(self.targets)


def test_fold_indices_for_other_problem_types():
    multi_hot = np.eye(3)[np.arange(30) % 3]
    folds = fold_indices(text_classification, _Rows(multi_hot), LabelSpace("multi_label", ["a", "b", "c"]), 5, 0,
                         "f.csv")
    assert sorted(np.concatenate(folds).tolist()) == list(range(30)) and all(len(f) == 6 for f in folds)
    groups = [f"g{i % 7}" for i in range(30)]
    folds = fold_indices(text_classification, _Rows(np.linspace(0, 1, 30), groups), LabelSpace("regression"), 3, 0,
                         "f.csv")
    for held in folds:
        inside = {groups[i] for i in held}
        outside = {groups[i] for i in range(30) if i not in set(held.tolist())}
        assert inside and not inside & outside


def test_ensemble_logits_average_probabilities():
    a, b = np.array([[0.0, 2.0]]), np.array([[1.0, -1.0]])
    soft = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)  # noqa: E731
    got = soft(ensemble_logits([a, b], "single_label"))
    assert np.allclose(got, (soft(a) + soft(b)) / 2, atol=1e-6)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert np.allclose(sig(ensemble_logits([a, b], "multi_label")), (sig(a) + sig(b)) / 2, atol=1e-6)
    assert np.allclose(ensemble_logits([a[:, :1], b[:, :1]], "regression"), [[0.5]])
    tokens = ensemble_logits([[a, a], [b, b]], "token_classification")
    assert len(tokens) == 2 and np.allclose(soft(tokens[1]), (soft(a) + soft(b)) / 2, atol=1e-6)


@pytest.mark.parametrize("args,data,expected", [
    (["--folds", "5"], {}, "train.csv: class 'meh' has only 3 example(s), too few for 5 folds"),
    (["--folds", "1"], {}, "cv.folds: Input should be greater than or equal to 2"),
    (["--folds", "40"], {"group_column": "film"}, "only 37 distinct groups in the group column, too few for 40 folds"),
])
def test_bad_cv_input(args, data, expected, tiny_model_dir, tmp_path, capsys):
    rows = sentiment_rows(120) + [{"text": "fun", "label": "meh", "film": "film1"} for _ in range(3)]
    if "group_column" in data:
        rows = rows[:120]
    cfg = _write(tmp_path, tiny_model_dir, rows, **data)
    code = main(["cv", str(cfg), *args])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "a failed cv must not leave a folder behind"


def test_cv_token_classification_with_ensemble(tmp_path):
    import torch
    from test_token_classification import VOCAB, ner_config, ner_sentences, write_conll
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path / "ner-bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}).save_pretrained(folder)
    sentences = ner_sentences(60, 3)
    train = write_conll(tmp_path / "train.conll", sentences)
    test = write_conll(tmp_path / "test.conll", ner_sentences(20, 4))
    cfg = ner_config(folder, train, test, tmp_path / "runs", epochs=1)
    result = tunesmith.cv(cfg, folds=3, keep_models=True)
    oof = pd.read_json(result.cv_dir / "oof_predictions.jsonl", lines=True)
    assert oof["row"].tolist() == list(range(1, 61)) and sorted(oof["fold"].unique()) == [1, 2, 3]
    assert oof["tokens"].tolist() == [w for w, _ in sentences]
    assert all(len(p) == len(w) for p, w in zip(oof["predicted_tags"], oof["tokens"]))
    assert "f1" in result.mean and result.test_metrics is not None
    preds = tunesmith.predict(result.cv_dir, test)
    assert len(preds) == 20 and "entities" in preds.columns
