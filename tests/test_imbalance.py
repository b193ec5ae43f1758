"""Class imbalance: class weights (balanced and by hand), weighted and focal losses against hand
computations, the oversampling sampler, the run summary, and resuming an oversampled, augmented run."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import tunesmith
import importlib
from conftest import sentiment_rows, tiny_config
from tunesmith import tags as tagging
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.imbalance import class_counts, class_weights, example_weights, focal_loss, make_loss
from tunesmith.tasks import text_classification as txt
from tunesmith.tasks import token_classification as tok
from tunesmith.loop import make_batches

train_module = importlib.import_module("tunesmith.loop")  # where the training loop saves checkpoints


def cfg_with(imbalance: dict, task: str = "text_classification", **data):
    return load_config({"task": task, "data": {"train": "x.csv", **data}, "imbalance": imbalance})


SINGLE = txt.LabelSpace("single_label", ["neg", "pos"])
MULTI = txt.LabelSpace("multi_label", ["a", "b", "c"])
NER = tok.LabelSpace(tok.NAME, tagging.bio_names(["LOC", "PER"]))  # O, B-LOC, I-LOC, B-PER, I-PER


def test_balanced_weights_single_label_hand_computed():
    targets = np.array([0] * 10 + [1] * 90)
    w = class_weights(txt, cfg_with({"method": "class_weights"}), targets, SINGLE)
    # n / (classes x n_c): 100 / (2 x 10) = 5, 100 / (2 x 90) = 0.5556
    assert w == pytest.approx([5.0, 100 / 180])
    assert class_counts(txt, targets, SINGLE) == {"neg": 10, "pos": 90}


def test_balanced_pos_weight_multi_label_hand_computed():
    targets = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 1]], dtype=np.float32)
    w = class_weights(txt, cfg_with({"method": "class_weights"}, problem_type="multi_label"), targets, MULTI)
    assert w == pytest.approx([3 / 1, 3 / 1, 0 / 4])  # negatives / positives per class
    assert class_counts(txt, targets, MULTI) == {"a": 1, "b": 1, "c": 4}


def test_hand_weights_by_class_and_by_entity_type():
    w = class_weights(txt, cfg_with({"method": "class_weights", "weights": {"neg": 4}}), np.array([0, 1]), SINGLE)
    assert w.tolist() == [4.0, 1.0]
    cfg = cfg_with({"method": "class_weights", "weights": {"PER": 3, "O": 0.5}}, task="token_classification")
    w = class_weights(tok, cfg, [np.array([0, 3, 0])], NER)
    assert dict(zip(NER.names, w.tolist())) == {"O": 0.5, "B-LOC": 1.0, "I-LOC": 1.0, "B-PER": 3.0, "I-PER": 3.0}
    with pytest.raises(TunesmithError, match=r"imbalance.weights: unknown class 'neutral' \(classes: neg, pos\)"):
        class_weights(txt, cfg_with({"method": "class_weights", "weights": {"neutral": 2}}), np.array([0, 1]), SINGLE)
    with pytest.raises(TunesmithError, match="unknown class 'ORG' \\(classes: LOC, PER, O\\)"):
        class_weights(tok, cfg_with({"method": "class_weights", "weights": {"ORG": 2}}, task="token_classification"),
                      [np.array([0])], NER)


def test_weighted_cross_entropy_matches_a_hand_computation():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 2), torch.tensor([0, 1, 1, 1, 0])
    w = np.array([3.0, 0.5], np.float32)
    loss = make_loss(cfg_with({"method": "class_weights"}), w, SINGLE)(logits, y)
    ce = -F.log_softmax(logits, dim=1)[torch.arange(5), y]
    wy = torch.tensor(w)[y]
    assert loss.item() == pytest.approx(((wy * ce).sum() / wy.sum()).item(), rel=1e-6)
    # token logits (batch, positions, tags) with ignored positions
    logits, y = torch.randn(2, 3, 5), torch.tensor([[-100, 3, 0], [1, -100, -100]])
    w = np.array([0.2, 1, 1, 2, 2], np.float32)
    loss = make_loss(cfg_with({"method": "class_weights"}, task="token_classification"), w, NER)(logits, y)
    keep = y.flatten() != -100
    flat, yy = logits.reshape(-1, 5)[keep], y.flatten()[keep]
    ce = -F.log_softmax(flat, dim=1)[torch.arange(3), yy]
    wy = torch.tensor(w)[yy]
    assert loss.item() == pytest.approx(((wy * ce).sum() / wy.sum()).item(), rel=1e-6)
    # multi-label pos_weight: a positive of class c counts w_c times
    logits, y = torch.randn(4, 3), torch.tensor([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 1]]).float()
    w = np.array([3, 3, 0.25], np.float32)
    loss = make_loss(cfg_with({"method": "class_weights"}, problem_type="multi_label"), w, MULTI)(logits, y)
    p = torch.sigmoid(logits)
    hand = -(torch.tensor(w) * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)


def test_focal_is_cross_entropy_at_gamma_0_and_matches_the_formula():
    torch.manual_seed(1)
    logits, y = torch.randn(2, 4, 5), torch.tensor([[0, 1, -100, 3], [4, -100, 2, 0]])
    assert focal_loss(logits, y, 0.0, False).item() == pytest.approx(
        F.cross_entropy(logits.reshape(-1, 5), y.flatten(), ignore_index=-100).item(), rel=1e-6)
    ml, my = torch.randn(3, 4), torch.tensor([[1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 0]]).float()
    assert focal_loss(ml, my, 0.0, True).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(ml, my).item(), rel=1e-6)
    # gamma 2, one example: -(1 - p_t)^2 log p_t
    one = torch.tensor([[2.0, 0.0]])
    p_t = torch.softmax(one, dim=1)[0, 1]
    assert focal_loss(one, torch.tensor([1]), 2.0, False).item() == pytest.approx(
        (-(1 - p_t) ** 2 * torch.log(p_t)).item(), rel=1e-6)
    # an easy example loses far more of its loss than a hard one
    easy, hard = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    ratio = lambda x: (focal_loss(x, torch.tensor([0]), 2.0, False) / F.cross_entropy(x, torch.tensor([0]))).item()  # noqa: E731
    assert ratio(easy) < 1e-3 and ratio(hard) > 0.9
    cfg = cfg_with({"method": "focal", "gamma": 0})
    assert make_loss(cfg, None, SINGLE)(one, torch.tensor([1])).item() == pytest.approx(
        F.cross_entropy(one, torch.tensor([1])).item(), rel=1e-6)


def test_oversampled_epoch_is_balanced_and_reproducible():
    targets = np.array([0] * 100 + [1] * 900)
    weights = class_weights(txt, cfg_with({"method": "oversample"}), targets, SINGLE)
    sample = example_weights(txt, targets, SINGLE, weights)
    lengths = list(np.random.default_rng(0).integers(5, 60, size=1000))
    batches = make_batches(lengths, 32, seed=3, group_by_length=True, sample_weights=sample)
    drawn = np.concatenate(batches)
    assert len(drawn) == 1000  # an epoch keeps its size
    share = (targets[drawn] == 0).mean()
    assert 0.45 < share < 0.55, share  # 10% of the data, about half of the draws
    assert make_batches(lengths, 32, 3, True, sample) == batches  # the seed fixes the epoch (resume)
    assert make_batches(lengths, 32, 4, True, sample) != batches
    # length grouping still holds: within a batch the lengths are close
    spread = np.mean([np.ptp(np.asarray(lengths)[b]) for b in batches])
    assert spread < 15
    # NER: a sentence weighs as its rarest tag
    ner_w = np.array([0.1, 5, 5, 1, 1])
    assert example_weights(tok, [np.array([0, 0]), np.array([0, 1, 2]), np.array([3])], NER, ner_w).tolist() == [0.1, 5, 1]


@pytest.fixture
def imbalanced_csv(tmp_path):
    rows = [r for i, r in enumerate(sentiment_rows(800, seed=1)) if r["label"] == "pos" or i % 8 == 1]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(100, seed=2)).to_csv(tmp_path / "test.csv", index=False)
    return tmp_path / "train.csv", tmp_path / "test.csv"


def test_run_summary_shows_distribution_and_weights(tiny_model_dir, imbalanced_csv, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, *imbalanced_csv, tmp_path / "runs", epochs=1)
    cfg["imbalance"] = {"method": "class_weights"}
    result = tunesmith.train(cfg)
    summary = json.loads((result.run_dir / "metrics.json").read_text())["imbalance"]
    train = summary["distribution"]["train"]
    n = train["neg"] + train["pos"]
    assert summary["weights"] == {c: pytest.approx(n / (2 * train[c]), abs=1e-4) for c in train}
    assert summary["distribution"]["test"] == {"neg": 50, "pos": 50}
    assert set(summary["distribution"]) == {"train", "validation", "test"}
    err = capsys.readouterr().err
    assert f"imbalance class_weights; class weights: {summary['weights']['neg']:.4f} neg, " in err
    assert f"train: {n} examples ({train['neg']} neg, {train['pos']} pos)" in err


def test_class_weights_beat_none_on_imbalanced_data(tiny_model_dir, imbalanced_csv, tmp_path):
    """The minority class is recalled far better with weights (and oversampling) than without."""
    recall = {}
    for method in ("none", "class_weights", "oversample"):
        cfg = tiny_config(tiny_model_dir, *imbalanced_csv, tmp_path / method, epochs=3)
        cfg["imbalance"] = {"method": method}
        recall[method] = tunesmith.train(cfg).metrics["per_class"]["neg"]["recall"]
    assert recall["class_weights"] > recall["none"] + 0.2, recall
    assert recall["oversample"] > recall["none"] + 0.2, recall


def test_resume_with_oversample_and_augment_matches_uninterrupted(tiny_model_dir, imbalanced_csv, tmp_path,
                                                                  monkeypatch):
    """Stopped right after a mid-epoch checkpoint (as a kill there would), the resumed run ends identical."""
    cfg = tiny_config(tiny_model_dir, *imbalanced_csv, tmp_path / "runs", epochs=2, batch_size=8,
                      checkpoint_every_steps=7, eval_every_steps=10)
    cfg["imbalance"] = {"method": "oversample"}
    cfg["augment"] = [{"op": "swap", "p": 0.5}, {"op": "delete", "p": 0.5, "rate": 0.2}]
    reference = tunesmith.train(cfg, {"output.name": "reference"})

    real_save = train_module.save_checkpoint

    def save_then_die(run_dir, model, optimizer, scheduler, state, *rest):
        real_save(run_dir, model, optimizer, scheduler, state, *rest)
        if state.step == 21:  # mid-epoch 0 (an epoch is 50 steps)
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(TunesmithError, match="interrupted"):
        tunesmith.train(cfg, {"output.name": "killed"})
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    killed = tmp_path / "runs" / "killed"
    state = json.loads((killed / "checkpoints" / "step-0000021" / "state.json").read_text())
    assert state["epoch"] == 0 and 0 < state["batch_in_epoch"]
    resumed = tunesmith.train(None, resume=killed)
    ref = json.loads((reference.run_dir / "metrics.json").read_text())
    got = json.loads((resumed.run_dir / "metrics.json").read_text())
    assert got["test"] == ref["test"] and got["best_step"] == ref["best_step"]
    ref_log = [json.loads(x) for x in (reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    got_log = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train_loss") for r in got_log] == [r.get("train_loss") for r in ref_log]


def test_oversample_replays_cached_features(tiny_model_dir, imbalanced_csv, tmp_path):
    """Oversampled batches repeat examples; the frozen-feature cache serves them by index."""
    cfg = tiny_config(tiny_model_dir, *imbalanced_csv, tmp_path / "runs", epochs=1)
    cfg["strategy"] = {"name": "linear_probe"}
    cfg["imbalance"] = {"method": "oversample"}
    cached = tunesmith.train(cfg)
    uncached = tunesmith.train(cfg, {"strategy.cache_features": "off"})
    summary = json.loads((cached.run_dir / "metrics.json").read_text())
    assert summary["strategy"]["feature_cache"] is not None
    a = pd.read_csv(cached.run_dir / "test_predictions.csv")["prob_pos"]
    b = pd.read_csv(uncached.run_dir / "test_predictions.csv")["prob_pos"]
    assert (a - b).abs().max() < 1e-5 and a.std() > 0  # same model either way
