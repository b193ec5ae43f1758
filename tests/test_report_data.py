"""The numbers behind each part of the report (report_data.py), on small hand-made inputs whose answers
are worked out here."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tunesmith import report_data as rd
from tunesmith.errors import TunesmithError


def test_curves_read_train_lines_validation_metrics_and_unfreeze_events():
    records = [{"type": "setup", "step": 0},
               {"type": "train", "step": 1, "loss": 0.9, "lr": 1e-4},
               {"type": "train", "step": 2, "loss": 0.7, "lr": 5e-5},
               {"type": "unfreeze", "step": 2, "layer": "layer.1", "lr": 1e-4},
               {"type": "eval", "step": 2, "epoch": 1.0, "lr": 5e-5, "train_loss": 0.8,
                "validation": {"accuracy": 0.75, "loss": 0.6}},
               {"type": "test", "step": 2, "test": {"accuracy": 0.7}}]
    c = rd.curves(records)
    assert c["loss"] == [(1, 0.9), (2, 0.7)] and c["lr"] == [(1, 1e-4), (2, 5e-5)]
    assert c["validation"] == {"accuracy": [(2, 0.75)], "loss": [(2, 0.6)]}
    assert c["unfreeze"] == [(2, "layer.1")]
    # a run folder written before the "train" lines: the evaluation lines give loss and lr
    old = rd.curves([r for r in records if r["type"] != "train"])
    assert old["loss"] == [(2, 0.8)] and old["lr"] == [(2, 5e-5)]


def _frame(labels, probs_pos):
    p = np.asarray(probs_pos, dtype=float)
    return pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels,
                         "predicted_label": np.where(p > 0.5, "pos", "neg"), "prob_neg": 1 - p, "prob_pos": p})


def test_scored_needs_labels_and_probabilities():
    s = rd.scored(_frame(["pos", "neg", "pos"], [0.9, 0.2, 0.4]), "label")
    assert s.names == ["neg", "pos"] and s.y_true.tolist() == [1, 0, 1] and s.y_pred.tolist() == [1, 0, 0]
    assert rd.scored(_frame(["pos"], [0.9]), "other_column") is None       # no true labels (predict output)
    assert rd.scored(_frame(["pos"], [0.9]).drop(columns=["prob_neg"]), "label") is None  # one class column
    assert rd.scored(None, "label") is None
    unknown = rd.scored(_frame(["pos", "maybe"], [0.9, 0.1]), "label")    # a label the model never saw: left out
    assert unknown.y_true.tolist() == [1]


def test_binary_curves_match_hand_computed_auc_and_ap():
    # positives score 0.8 and 0.4, negatives 0.6 and 0.2: of 4 (positive, negative) pairs 3 are ordered: AUC 0.75
    y, p = np.array([1, 0, 1, 0]), np.array([0.8, 0.6, 0.4, 0.2])
    found = rd.binary_curves(y, p)
    assert found["auc"] == pytest.approx(0.75)
    # AP = sum over positives of precision at its rank / positives = (1/1 + 2/3) / 2
    assert found["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert found["recall"][0] == 1.0 and found["fpr"][0] == 0.0 and found["tpr"][-1] == 1.0
    assert rd.binary_curves(np.array([1, 1]), np.array([0.2, 0.9])) is None  # one class only: undefined


def test_calibration_bins_and_ece():
    # top-class confidences 0.95, 0.95 (one right, one wrong) and 0.65 (right)
    probs = np.array([[0.05, 0.95], [0.95, 0.05], [0.35, 0.65]])
    y = np.array([1, 1, 0])
    found = rd.calibration(y, probs, bins=10)
    assert [(b["count"], b["accuracy"]) for b in found["bins"]] == [(1, 0.0), (2, 0.5)]
    assert found["bins"][0]["confidence"] == pytest.approx(0.65)
    assert found["bins"][1]["confidence"] == pytest.approx(0.95)
    # ECE = 1/3 * |0 - 0.65| + 2/3 * |0.5 - 0.95|
    assert found["ece"] == pytest.approx(0.65 / 3 + 2 / 3 * 0.45)


def test_worst_errors_are_the_most_confident_mistakes_first():
    s = rd.scored(_frame(["neg", "neg", "pos", "pos", "neg"], [0.7, 0.99, 0.1, 0.8, 0.2]), "label")
    worst = rd.worst_errors(s, k=2)
    assert worst["text"].tolist() == ["t1", "t2"]  # wrong at 0.99, then wrong at 0.9 (prob_neg of t2)
    assert worst["true"].tolist() == ["neg", "pos"] and worst["predicted"].tolist() == ["pos", "neg"]
    assert worst["confidence"].tolist() == [0.99, 0.9]
    assert "prob_pos" not in worst and len(rd.worst_errors(s, k=10)) == 3


def test_confusion_and_per_class_from_saved_metrics():
    metrics = {"per_class": {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2},
                             "b": {"precision": 0.5, "recall": 1.0, "f1": 0.667, "support": 1}},
               "confusion_matrix": [[1, 1], [0, 1]]}
    matrix, names = rd.confusion(metrics)
    assert names == ["a", "b"] and matrix.tolist() == [[1, 1], [0, 1]]
    assert rd.per_class(metrics)[0] == {"name": "a", "precision": 1.0, "recall": 0.5, "f1": 0.667, "support": 2}
    assert rd.confusion({"per_class": metrics["per_class"]}) is None  # NER: per type, no matrix
    many = np.diag([5, 5, 5]) + np.array([[0, 3, 0], [1, 0, 0], [0, 7, 0]])
    assert rd.top_confusions(many, ["a", "b", "c"], k=2).values.tolist() == [["c", "b", 7], ["a", "b", 3]]
    assert rd.top_confusions(np.diag([2, 2]), ["a", "b"]).empty


def test_tag_errors_list_sentences_with_wrong_tags_most_confident_first():
    frame = pd.DataFrame([
        {"tokens": ["alice", "met", "bob"], "tags": ["B-PER", "O", "B-PER"], "predicted_tags": ["B-PER", "O", "O"],
         "entities": [{"type": "PER", "score": 0.6}]},
        {"tokens": ["in", "paris"], "tags": ["O", "B-LOC"], "predicted_tags": ["O", "B-LOC"],
         "entities": [{"type": "LOC", "score": 0.99}]},
        {"tokens": ["see", "rome"], "tags": ["O", "B-LOC"], "predicted_tags": ["B-PER", "B-LOC"],
         "entities": [{"type": "PER", "score": 0.8}, {"type": "LOC", "score": 0.7}]}])
    errors = rd.tag_errors(frame)
    assert errors["row"].tolist() == [3, 1] and errors["confidence"].tolist() == [0.8, 0.6]
    assert errors["differences"].tolist() == ["see (O -> B-PER)", "bob (B-PER -> O)"]
    assert rd.tag_errors(_frame(["pos"], [0.9])) is None


def test_read_predictions_turns_csv_lists_back_into_lists(tmp_path):
    path = tmp_path / "test_predictions.csv"
    pd.DataFrame({"tokens": [["a", "b"]], "entities": [[{"type": "PER", "score": 0.5}]], "n": [1]}).to_csv(path, index=False)
    frame = rd.read_predictions(path)
    assert frame["tokens"][0] == ["a", "b"] and frame["entities"][0][0]["score"] == 0.5
    # a cell that is no Python literal (code, say) stays text: literal_eval never runs it
    pd.DataFrame({"x": ["[__import__('os').getpid()]"]}).to_csv(path, index=False)
    assert rd.read_predictions(path)["x"][0].startswith("[__import__")


def test_misclassified_images_found_relative_to_the_test_table(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / name)
    frame = _frame(["neg", "pos", "neg"], [0.9, 0.2, 0.1])
    frame.insert(0, "image", ["img/a.png", "img/b.png", "img/missing.png"])
    s = rd.scored(frame, "label")
    assert rd.image_column(s.frame) == "image"
    found = rd.misclassified_images(s, tmp_path)
    assert [f["path"].name for f in found] == ["a.png", "b.png"] and found[0]["predicted"] == "pos"
    assert rd.misclassified_images(rd.scored(_frame(["neg"], [0.9]), "label"), tmp_path) == []  # no image column


def test_trial_values_best_so_far_follows_the_direction():
    trials = [{"number": 0, "state": "complete", "value": 0.6}, {"number": 1, "state": "pruned", "value": 0.9},
              {"number": 2, "state": "complete", "value": 0.7}, {"number": 3, "state": "fail", "value": None},
              {"number": 4, "state": "complete", "value": 0.5}]
    up = rd.trial_values(rd.RunData(None, "search", {}, {"trials": trials, "direction": "maximize"}))
    assert up["best_so_far"] == [0.6, 0.6, 0.7, 0.7, 0.7]  # a pruned trial's value is not a result
    assert np.isnan(up["value"][3])
    down = rd.trial_values(rd.RunData(None, "search", {}, {"trials": trials, "direction": "minimize"}))
    assert down["best_so_far"] == [0.6, 0.6, 0.6, 0.6, 0.5]
    assert up["minutes"] is None  # a search.json from before trials recorded their start
    for t, start in zip(trials, ["10:00:00", "10:00:30", "10:01:30", "10:03:00", "10:04:00"]):
        t["started"] = f"2026-12-01T{start}"
    timed = rd.trial_values(rd.RunData(None, "search", {}, {"trials": trials[::-1], "direction": "maximize"}))
    assert timed["number"] == [0, 1, 2, 3, 4] and timed["minutes"] == [0.0, 0.5, 1.5, 3.0, 4.0]


def test_fold_table_and_comparison():
    cv = rd.RunData(None, "cv", {}, {"per_fold": [{"accuracy": 0.8}, {"accuracy": 0.6}],
                                     "mean": {"accuracy": 0.7}, "std_dev": {"accuracy": 0.1414}})
    table = rd.fold_table(cv)
    assert table.index.tolist() == ["fold 1", "fold 2", "mean", "std"] and table.loc["mean", "accuracy"] == 0.7
    a = rd.RunData(_P("a"), "run", {"train": {"lr": 1e-3, "seed": 0}, "output": {"dir": "x"}},
                   {"test": {"accuracy": 0.8, "per_class": {}}, "train": {"seconds": 3.0, "samples_per_second": 10}})
    b = rd.RunData(_P("b"), "run", {"train": {"lr": 1e-4, "seed": 0}, "output": {"dir": "y"}},
                   {"test": {"accuracy": 0.9}, "train": {"seconds": 4.0, "samples_per_second": 8}})
    frame = rd.comparison([a, b])
    assert frame["run"].tolist() == ["a", "b"] and frame["train.lr"].tolist() == [1e-3, 1e-4]
    assert "train.seed" not in frame and "output.dir" not in frame  # only what differs, never where it was written
    assert frame["accuracy"].tolist() == [0.8, 0.9] and frame["train s"].tolist() == [3.0, 4.0]


class _P:
    def __init__(self, name):
        self.name = name


def test_load_folder_refuses_what_is_not_a_finished_folder(tmp_path):
    with pytest.raises(TunesmithError, match="not found"):
        rd.load_folder(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("task: text_classification\n")
    with pytest.raises(TunesmithError, match=r"half: not a finished tunesmith run, cv or search folder"):
        rd.load_folder(tmp_path / "half")
    (tmp_path / "half" / "metrics.json").write_text("{not json")
    with pytest.raises(TunesmithError, match=r"metrics.json: cannot read"):
        rd.load_folder(tmp_path / "half")
    (tmp_path / "half" / "metrics.json").write_text(json.dumps({"test": {"accuracy": 1.0}}))
    (tmp_path / "half" / "metrics.jsonl").write_text('{"type": "eval", "step": 1}\n{"type": "ev')  # torn last line
    run = rd.load_folder(tmp_path / "half")
    assert run.kind == "run" and run.records == [{"type": "eval", "step": 1}] and run.predictions is None


def test_facts_name_sizes_classes_speed_hardware_and_a_refit():
    summary = {"data": {"train": 900, "validation": 100, "test": 300},
               "imbalance": {"distribution": {"train": {"neg": 450, "pos": 450}}},
               "train": {"steps": 60, "seconds": 12.5, "samples_per_second": 76.8, "precision": "fp32",
                         "trainable_parameters": 10, "total_parameters": 20},
               "refit": {"status": "done", "rows": 1000, "steps": 60, "seconds": 13.0},
               "hardware": {"device": "cpu", "cpu": "AMD EPYC", "cpu_cores": 2, "torch_threads": 2, "torch": "2.14.1"}}
    facts = dict(rd.facts(rd.RunData(None, "run", {}, summary)))
    assert facts["examples"] == "train 900, validation 100, test 300"
    assert facts["classes (train)"] == "neg 450, pos 450"
    assert facts["training"] == "60 steps in 12.5 s, 76.8 samples/s, precision fp32"
    assert facts["refit"].startswith("trained again on 1000 rows (train + validation) for 60 steps")
    assert facts["hardware"] == "cpu; AMD EPYC; 2 cores, 2 torch threads; torch 2.14.1"
