"""Knowledge distillation (distill: section, data.unlabeled) on tiny random models: the soft-target term
against a hand computation, teacher outputs cached and equal to a fresh teacher pass, unlabelled inputs
learning only from soft targets, words lining up across tokenizers, a shallower student, mismatched
teachers refused in one line, and a killed distillation resumed to the same result."""

from __future__ import annotations

import json
import subprocess
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import tunesmith
from conftest import TUNESMITH, VOCAB, kill_after_first_checkpoint, save_tiny_bert, sentiment_rows, tiny_config
from test_token_classification import VOCAB as NER_VOCAB
from test_token_classification import ner_sentences, write_conll
from tunesmith import distill
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.inference import LoadedRun
from tunesmith.tasks import TASKS
from tunesmith.tasks.base import IGNORE
from tunesmith.train import setup


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))  # teacher outputs kept here, per test


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    """A tiny BERT trained on the sentiment rows (labels neg, pos), its data files, and an unlabelled file."""
    root = tmp_path_factory.mktemp("distill")
    model = save_tiny_bert(root / "model", VOCAB)
    pd.DataFrame(sentiment_rows(240, seed=1)).to_csv(root / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(60, seed=2)).to_csv(root / "test.csv", index=False)
    unlabeled = pd.DataFrame(sentiment_rows(40, seed=5))
    unlabeled["label"] = "neg"  # a wrong label column: it must never be read
    unlabeled.to_csv(root / "unlabeled.csv", index=False)
    cfg = tiny_config(model, root / "train.csv", root / "test.csv", root / "runs", epochs=2)
    run = tunesmith.train({**cfg, "output": {**cfg["output"], "name": "teacher"}})
    return {"root": root, "model": model, "run": run.run_dir, "cfg": cfg}


def _student_cfg(t: dict, out: Path, name: str, unlabeled: bool = False, **distill_cfg) -> dict:
    cfg = tiny_config(t["model"], t["root"] / "train.csv", t["root"] / "test.csv", out, epochs=2,
                      checkpoint_every_steps=5)
    cfg["output"]["name"] = name
    cfg["distill"] = {"teacher": str(t["run"]), "temperature": 2.0, "alpha": 0.5, **distill_cfg}
    if unlabeled:
        cfg["data"]["unlabeled"] = str(t["root"] / "unlabeled.csv")
    return cfg


# ---------------------------------------------------------------- the loss

def test_soft_target_term_against_a_hand_computation():
    student = np.array([[1.0, -0.5, 0.25], [0.0, 2.0, -1.0], [3.0, 0.0, 0.0]])
    teacher = np.array([[0.5, 0.5, -2.0], [1.0, 1.5, 0.0], [np.nan, np.nan, np.nan]])  # last row: no target
    T = 3.0
    softmax = lambda x: np.exp(x / T) / np.exp(x / T).sum()  # noqa: E731
    kl = [sum(p * np.log(p / q) for p, q in zip(softmax(t), softmax(s))) for s, t in zip(student[:2], teacher[:2])]
    hand = T ** 2 * np.mean(kl)
    got = distill.soft_target_loss(torch.tensor(student), torch.tensor(teacher), T)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    assert distill.soft_target_loss(torch.tensor(student[:1]), torch.tensor(student[:1]), T).item() == \
        pytest.approx(0.0, abs=1e-7)  # a student that matches its teacher pays nothing


class _FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a parameter: the loss and its gradients can be read row by row."""

    def __init__(self, logits: np.ndarray):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float32))

    def forward(self, input_ids, **kw):
        return type("Out", (), {"logits": self.logits[:len(input_ids)]})()


def test_loss_mixes_soft_and_hard_terms_and_unlabelled_rows_give_only_soft_ones():
    task = TASKS["text_classification"]
    logits = np.array([[2.0, -1.0], [0.5, 0.0], [-1.0, 1.0]])
    targets = [np.array([1.0, 0.0]), np.array([-2.0, 2.0]), np.array([0.0, 3.0])]
    labels = torch.tensor([0, 1, IGNORE])  # the third row is unlabelled
    batch = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": labels}
    features = [{"input_ids": [0] * 4}] * 3
    cfg = load_config({"data": {"train": "x"}, "distill": {"teacher": "t", "temperature": 2.0, "alpha": 0.3}})
    model = _FixedLogits(logits)
    loss = distill.distill_loss(task, model, batch, features, targets, cfg, None)
    lg = torch.tensor(logits, dtype=torch.float32)
    soft = distill.soft_target_loss(lg, torch.tensor(np.stack(targets)), 2.0)
    hard = torch.nn.functional.cross_entropy(lg[:2], labels[:2])  # labelled rows only
    assert loss.item() == pytest.approx(0.3 * soft.item() + 0.7 * hard.item(), rel=1e-6)

    # alpha 0 (labels only): an unlabelled row contributes nothing at all, not even a gradient
    cfg0 = load_config({"data": {"train": "x"}, "distill": {"teacher": "t", "alpha": 0.0}})
    model = _FixedLogits(logits)
    distill.distill_loss(task, model, batch, features, targets, cfg0, None).backward()
    assert torch.all(model.logits.grad[2] == 0) and torch.any(model.logits.grad[:2] != 0)
    # alpha 1 (soft targets only): the labels play no part
    cfg1 = load_config({"data": {"train": "x"}, "distill": {"teacher": "t", "alpha": 1.0}})
    flipped = {**batch, "labels": torch.tensor([1, 0, IGNORE])}
    assert distill.distill_loss(task, _FixedLogits(logits), batch, features, targets, cfg1, None).item() == \
        pytest.approx(distill.distill_loss(task, _FixedLogits(logits), flipped, features, targets, cfg1, None).item())


# ---------------------------------------------------------------- teacher outputs: cached, equal to fresh ones

def _setup(cfg: dict):
    with ExitStack() as locks:
        return setup(cfg, locks=locks)


def test_teacher_cache_equals_fresh_teacher_outputs(text_teacher, tmp_path):
    run = _setup(_student_cfg(text_teacher, tmp_path, "s"))
    train = run.splits.train
    fresh = LoadedRun(text_teacher["run"], precision="fp32").logits(train)  # the teacher alone, as predict runs it
    cached = np.stack(run.teacher.targets)
    np.testing.assert_allclose(cached, np.asarray(fresh)[:, run.teacher.columns], atol=1e-5)
    assert run.teacher.summary["forward_inputs"] == len(train)
    cache_file = Path(run.teacher.summary["cache_file"])
    assert cache_file.is_file()

    # a second run (or a resume) with the same teacher and inputs reads them back: no teacher pass
    again = _setup(_student_cfg(text_teacher, tmp_path, "s2"))
    assert "forward_inputs" not in again.teacher.summary
    assert again.teacher.summary["read_from_cache"] == len(train)
    np.testing.assert_allclose(np.stack(again.teacher.targets), cached, atol=1e-5)


def test_a_teacher_with_its_labels_in_another_order_is_read_in_the_students_order(text_teacher, tmp_path):
    # a plain Hugging Face folder whose id2label says pos, neg (the student's order is neg, pos)
    from transformers import AutoModelForSequenceClassification
    teacher = AutoModelForSequenceClassification.from_pretrained(text_teacher["run"] / "model")
    w, b = teacher.classifier.weight.data.clone(), teacher.classifier.bias.data.clone()
    teacher.classifier.weight.data, teacher.classifier.bias.data = w.flip(0), b.flip(0)
    teacher.config.id2label, teacher.config.label2id = {0: "pos", 1: "neg"}, {"pos": 0, "neg": 1}
    folder = tmp_path / "flipped"
    teacher.save_pretrained(folder)
    LoadedRun(text_teacher["run"]).processor.save_pretrained(folder)
    original = _setup(_student_cfg(text_teacher, tmp_path, "a"))
    flipped = _setup({**_student_cfg(text_teacher, tmp_path, "b"), "distill": {"teacher": str(folder)}})
    assert flipped.teacher.columns == [1, 0]
    np.testing.assert_allclose(np.stack(flipped.teacher.targets), np.stack(original.teacher.targets), atol=1e-5)


def test_unlabeled_data_enters_only_through_soft_targets(text_teacher, tmp_path):
    run = _setup(_student_cfg(text_teacher, tmp_path, "u", unlabeled=True))
    n_train, n_unlabeled = len(run.splits.train), 40
    features = run.train_enc.features
    assert len(features) == len(run.teacher.targets) == n_train + n_unlabeled
    # the file's label column (all 'neg') is never read: every unlabelled input has no hard label
    assert all(f["labels"] == IGNORE for f in features[n_train:])
    assert all(f["labels"] != IGNORE for f in features[:n_train])
    assert run.plan.steps_per_epoch == -(-(n_train + n_unlabeled) // 16)  # they are training inputs
    # their soft targets are the teacher's outputs on those texts
    unlabeled = run.task.read_examples(str(text_teacher["root"] / "unlabeled.csv"), run.cfg, run.labels,
                                       require_labels=False)
    fresh = LoadedRun(text_teacher["run"], precision="fp32").logits(unlabeled)
    np.testing.assert_allclose(np.stack(run.teacher.targets[n_train:]), np.asarray(fresh), atol=1e-5)
    # with alpha 0 a batch of unlabelled inputs gives no loss and no gradient
    cfg0 = run.cfg.model_copy(update={"distill": run.cfg.distill.model_copy(update={"alpha": 0.0})})
    idx = list(range(n_train, n_train + 8))
    collate = run.task.make_collate(run.processor, 1)
    batch = collate([features[i] for i in idx])
    loss = distill.distill_loss(run.task, run.model, batch, [features[i] for i in idx],
                                [run.teacher.targets[i] for i in idx], cfg0, None)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in run.model.parameters())


# ---------------------------------------------------------------- token classification: words line up

def _char_vocab_teacher(folder: Path, names: list[str]) -> Path:
    """A token-classification BERT whose tokenizer knows no whole word: every word splits into letters,
    so its sub-tokens never line up with the student's (which knows the words)."""
    from transformers import BertConfig, BertForTokenClassification, BertTokenizer
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(letters) + [f"##{c}" for c in letters]
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=256, num_labels=len(names),
                        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(1)
    BertForTokenClassification(config).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


def test_token_soft_targets_line_up_by_word_across_tokenizers(tmp_path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    student = save_tiny_bert(tmp_path / "student", NER_VOCAB)
    write_conll(tmp_path / "train.conll", ner_sentences(30, 1))
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    teacher_dir = _char_vocab_teacher(tmp_path / "teacher", names[::-1])  # another label order too
    cfg = {"task": "token_classification", "model": {"name": str(student), "max_length": 64},
           "data": {"train": str(tmp_path / "train.conll"), "validation_fraction": 0.2},
           "train": {"precision": "fp32", "batch_size": 8}, "output": {"dir": str(tmp_path / "runs")},
           "distill": {"teacher": str(teacher_dir)}}
    run = _setup(cfg)
    assert run.labels.names == names
    # the teacher by hand: its logits at the first letter of each word, columns in the student's order
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForTokenClassification.from_pretrained(teacher_dir).eval()
    columns = [names[::-1].index(n) for n in names]
    for i, words in enumerate(run.splits.train.texts):
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        assert enc["input_ids"].shape[1] > len(words) + 2  # really split into sub-tokens
        with torch.no_grad():
            logits = model(**enc).logits[0].numpy()
        word_ids = enc.word_ids()
        firsts = [word_ids.index(w) for w in range(len(words))]
        want = logits[firsts][:, columns]
        got = run.teacher.targets[i]
        assert got.shape == (len(words), len(names))  # one row per word, at the student's first sub-tokens
        np.testing.assert_allclose(got, want, atol=1e-5)
    # and the student trains on them end to end
    result = tunesmith.train({**cfg, "train": {**cfg["train"], "max_steps": 6}})
    assert json.loads((result.run_dir / "metrics.json").read_text())["distill"]["words_without_soft_target"] == 0


# ---------------------------------------------------------------- a shallower student

def test_student_layers_keeps_evenly_spread_blocks_and_saves_a_plain_model(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    full = BertForSequenceClassification(config)
    original = [block.state_dict() for block in full.bert.encoder.layer]
    assert distill.keep_blocks(full, 3, "m") == [0, 2, 5]
    assert len(full.bert.encoder.layer) == 3 and full.config.num_hidden_layers == 3
    for block, i in zip(full.bert.encoder.layer, [0, 2, 5]):
        assert all(torch.equal(v, original[i][k]) for k, v in block.state_dict().items())
    full.eval().save_pretrained(tmp_path / "m")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    ids = torch.tensor([[2, 7, 8, 3]])
    assert loaded.config.num_hidden_layers == 3
    torch.testing.assert_close(loaded(input_ids=ids).logits, full(input_ids=ids).logits)
    with pytest.raises(TunesmithError, match="7 blocks asked, m has 3"):
        distill.keep_blocks(full, 7, "m")


def test_student_layers_trains_a_smaller_model(text_teacher, tmp_path):
    cfg = _student_cfg(text_teacher, tmp_path, "small", student_layers=1)
    # starting from the teacher's own blocks: model.name is the teacher's model folder
    from_teacher = {**cfg, "model": {**cfg["model"], "name": str(text_teacher["run"] / "model")}}
    run = _setup(from_teacher)
    teacher_block = LoadedRun(text_teacher["run"]).model.bert.encoder.layer[0].state_dict()
    assert len(run.model.bert.encoder.layer) == 1
    assert all(torch.equal(v, teacher_block[k]) for k, v in run.model.bert.encoder.layer[0].state_dict().items())
    result = tunesmith.train({**cfg, "train": {**cfg["train"], "max_steps": 4}})
    saved = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1
    assert tunesmith.predict(result.run_dir, ["a great film"]).shape[0] == 1


# ---------------------------------------------------------------- refused up front, in one line

def test_a_teacher_with_other_labels_is_refused_in_one_line(text_teacher, tmp_path):
    # (the CLI prints a TunesmithError as this one line with exit code 2: tests/test_tasks.py)
    rows = pd.DataFrame(sentiment_rows(60, seed=3))
    rows["label"] = rows["label"].map({"pos": "good", "neg": "bad"})
    rows.to_csv(tmp_path / "other.csv", index=False)
    cfg = _student_cfg(text_teacher, tmp_path / "runs", "x")
    cfg["data"] = {"train": str(tmp_path / "other.csv")}
    with pytest.raises(TunesmithError) as err:
        tunesmith.train(cfg)
    assert str(err.value) == (
        f"distill.teacher {text_teacher['run']}: its labels (neg, pos) are not the training data's "
        "(bad, good); the teacher must predict the same label names")
    assert not (tmp_path / "runs").exists()


def _bad(change: str, cfg: dict) -> dict:
    """The student config with one mistake."""
    if change == "no teacher folder":
        cfg["distill"] = {"teacher": "/no/such/teacher"}
    elif change == "alpha without a teacher":
        cfg["distill"] = {"alpha": 0.3}
    elif change == "unlabeled without a teacher":
        cfg["data"]["unlabeled"], cfg["distill"] = "u.csv", {}
    elif change == "alpha above 1":
        cfg["distill"]["alpha"] = 1.5
    elif change == "image augmentation":
        cfg["task"], cfg["augment"] = "image_classification", [{"op": "flip"}]
    elif change == "label smoothing":
        cfg["task"], cfg["image_classification"] = "image_classification", {"label_smoothing": 0.1}
    elif change == "oversample with unlabeled":
        cfg["data"]["unlabeled"], cfg["imbalance"] = "u.csv", {"method": "oversample"}
    elif change == "regression":
        cfg["data"]["problem_type"] = "regression"
    return cfg


@pytest.mark.parametrize("change, message", [
    ("no teacher folder", "/no/such/teacher"),
    ("alpha without a teacher", "'alpha' applies with a teacher: set distill.teacher"),
    ("unlabeled without a teacher", "data.unlabeled needs distill.teacher"),
    ("alpha above 1", "distill.alpha: Input should be less than or equal to 1"),
    ("image augmentation", "distill.teacher with image augmentation is not supported"),
    ("regression", "not problem_type 'regression'"),
    ("label smoothing", "label_smoothing both soften the targets"),
    ("oversample with unlabeled", "oversample draws labelled examples only: not with data.unlabeled"),
])
def test_bad_distill_settings_are_one_line_errors(text_teacher, tmp_path, change, message):
    cfg = _bad(change, _student_cfg(text_teacher, tmp_path / "runs", "bad"))
    with pytest.raises(TunesmithError) as err:
        tunesmith.train(cfg)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "runs").exists()


def test_a_teacher_for_another_task_is_refused(text_teacher, tmp_path):
    write_conll(tmp_path / "train.conll", ner_sentences(20, 1))
    cfg = {"task": "token_classification", "model": {"name": str(save_tiny_bert(tmp_path / "m", NER_VOCAB))},
           "data": {"train": str(tmp_path / "train.conll")}, "distill": {"teacher": str(text_teacher["run"])},
           "output": {"dir": str(tmp_path / "runs")}}
    with pytest.raises(TunesmithError, match="a text_classification model; this run is token_classification"):
        tunesmith.train(cfg)


# ---------------------------------------------------------------- kill and resume, with a teacher

def test_kill_and_resume_with_a_teacher_ends_as_an_uninterrupted_run(text_teacher, tmp_path, cli_env):
    cfg = _student_cfg(text_teacher, tmp_path / "runs", "reference", unlabeled=True)
    cfg["train"]["epochs"] = 3
    ref = tunesmith.train(cfg).run_dir
    summary = json.loads((ref / "metrics.json").read_text())
    d = summary["distill"]  # what the run records about its teacher
    assert (d["teacher"], d["temperature"], d["alpha"], d["unlabeled"]) == (str(text_teacher["run"]), 2.0, 0.5, 40)
    assert d["student_test"]["accuracy"] == summary["test"]["accuracy"] and 0 < d["teacher_test"]["accuracy"] <= 1

    cfg["output"]["name"] = "killed"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    killed = tmp_path / "runs" / "killed"
    kill_after_first_checkpoint(tmp_path / "cfg.yaml", killed, cli_env, tmp_path)
    assert not (killed / "metrics.json").exists(), "finished before the kill: nothing was tested"
    resumed = subprocess.run(TUNESMITH + ["train", str(tmp_path / "cfg.yaml"), "--resume", str(killed)],
                             capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    got = json.loads((killed / "metrics.json").read_text())
    assert got["train"]["steps"] == summary["train"]["steps"] and got["best_step"] == summary["best_step"]
    assert got["test"]["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-6)
    from safetensors.torch import load_file
    a, b = load_file(ref / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# ---------------------------------------------------------------- images

def test_image_distillation_uses_the_teachers_outputs_per_image(tmp_path):
    from test_tasks import _image_case
    case = _image_case(tmp_path)
    cfg = {**case["config"], "data": {"train": str(case["train"]), "test": str(case["test"]),
                                      "validation_fraction": 0.2},
           "output": {"dir": str(tmp_path / "runs")}}
    cfg["train"] = {**cfg["train"], "max_steps": 2}
    teacher = tunesmith.train({**cfg, "output": {**cfg["output"], "name": "teacher"}}).run_dir
    student = {**cfg, "distill": {"teacher": str(teacher)}, "output": {**cfg["output"], "name": "student"}}
    run = _setup(student)
    fresh = LoadedRun(teacher, precision="fp32").logits(run.splits.train)
    np.testing.assert_allclose(np.stack(run.teacher.targets), np.asarray(fresh), atol=1e-5)
    result = tunesmith.train(student)
    d = json.loads((result.run_dir / "metrics.json").read_text())["distill"]
    assert d["teacher"] == str(teacher) and "accuracy" in d["teacher_test"]


def test_with_augmentation_only_the_changed_inputs_go_through_the_teacher(text_teacher, tmp_path):
    cfg = _student_cfg(text_teacher, tmp_path, "aug")
    cfg["augment"] = [{"op": "swap", "p": 0.3}, {"op": "delete", "p": 0.3, "rate": 0.2}]
    run = _setup(cfg)
    t, n = run.teacher, len(run.splits.train)
    before = t.summary["forward_inputs"]
    enc1 = run.task.encode(run.processor, run.splits.train, run.cfg, train=True, epoch=1)
    distill.epoch_inputs(t, run.task, run.processor, run.splits.train, enc1, run.cfg, epoch=1)
    new = t.summary["forward_inputs"] - before
    assert 0 < new < n  # some inputs changed between epochs 0 and 1, and only those went through the teacher
    # the targets are the teacher's outputs on epoch 1's augmented inputs, as a fresh pass gives them
    from tunesmith.inference import predict_outputs
    teacher_enc = t.task.encode(t.processor, run.splits.train, t.cfg, train=True, epoch=1)
    fresh, _ = predict_outputs(t.model, t.task, teacher_enc.features, teacher_enc.lengths,
                               t.task.make_collate(t.processor, 1), 64, t.device, "fp32")
    np.testing.assert_allclose(np.stack(t.targets), np.stack(fresh), atol=1e-5)
    assert [f["input_ids"] for f in enc1.features] != [f["input_ids"] for f in run.train_enc.features]
