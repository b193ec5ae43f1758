"""Text augmentation: the WordNet reader on a tiny hand-written database (and the real one when it can
be fetched), each operation, seeding, NER tag alignment, contextual replacement with a tiny masked-LM,
the preview command and bad input."""

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

import tunesmith
from conftest import TUNESMITH, VOCAB, save_tiny_bert, sentiment_rows, tiny_config
from test_bad_input import error_line, run_cli
from test_token_classification import ner_config, ner_files, ner_model_dir, ner_sentences  # noqa: F401
from tunesmith import tags as tagging
from tunesmith import wordnet
from tunesmith.augment import Augmenter
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError

SYNSETS = {"noun": [["film", "movie", "picture"], ["movie_theater", "cinema"], ["film", "celluloid"],
                    ["paris", "City_of_Light"], ["story", "tale"]],
           "verb": [["see", "watch"], ["meet", "encounter"], ["visit", "call_in"]],
           "adj": [["good", "great(a)"], ["boring", "dull"]],
           "adv": [["today", "nowadays"]]}


def write_wordnet(folder: Path, synsets: dict) -> Path:
    """A database in WordNet 3.0's file format: license lines, data lines at their byte offsets, index lines."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "  1 A tiny test database in the format of WordNet 3.0.  \n  2 \n"
    for pos in wordnet.POS:
        data, index = header, {}
        for words in synsets.get(pos, []):
            offset = len(data.encode())
            data += (f"{offset:08d} 00 {pos[0]} {len(words):02x} " + " ".join(f"{w} 0" for w in words)
                     + " 000 | a gloss  \n")
            for w in words:
                index.setdefault(re.sub(r"\(\w+\)$", "", w).lower(), []).append(offset)
        (folder / f"data.{pos}").write_text(data)
        (folder / f"index.{pos}").write_text(header + "".join(
            f"{w} {pos[0]} {len(offs)} 1 @ {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  \n"
            for w, offs in sorted(index.items())))
    return folder


@pytest.fixture(scope="module")
def tiny_wordnet(tmp_path_factory) -> Path:
    return write_wordnet(tmp_path_factory.mktemp("wordnet"), SYNSETS)


def ops(*specs: dict):
    return load_config({"data": {"train": "x.csv"}, "augment": list(specs)}).augment


def augment_one(tiny_wordnet, text: str, *specs, seed: int = 0, epoch: int = 0) -> list[str]:
    words, _ = Augmenter(ops(*specs), seed, tiny_wordnet).augment([text.split()], None, epoch)
    return words[0]


# ---------------------------------------------------------------- WordNet files

def test_wordnet_reader_on_a_hand_written_database(tiny_wordnet):
    wn = wordnet.WordNet(tiny_wordnet)
    assert wn.synonyms("film") == ("movie", "picture", "celluloid")  # both synsets, in file order
    assert wn.synonyms("Cinema") == ("movie theater",)               # case-insensitive, '_' is a space
    assert wn.synonyms("great") == ("good",)                         # the '(a)' marker is dropped
    assert wn.synonyms("good") == ("great",)
    assert wn.synonyms("unknown") == ()


def test_wordnet_files_that_do_not_match_are_reported(tmp_path):
    folder = write_wordnet(tmp_path / "wn", SYNSETS)
    data = (folder / "data.noun").read_text()
    (folder / "data.noun").write_text("  3 one more license line shifts every offset\n" + data)
    with pytest.raises(TunesmithError, match=r"data.noun, byte \d+: no synset there"):
        wordnet.WordNet(folder).synonyms("film")
    (folder / "index.adv").unlink()
    with pytest.raises(TunesmithError, match="not a WordNet database"):
        wordnet.WordNet(folder)


def test_missing_wordnet_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(wordnet, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TunesmithError, match=r"apt-get install wordnet-base. or .tunesmith fetch wordnet"):
        wordnet.find_wordnet()


def test_real_wordnet_from_debian():
    try:
        folder = wordnet.fetch_wordnet()
    except TunesmithError as exc:
        pytest.skip(f"WordNet cannot be fetched here: {exc}")
    wn = wordnet.load(str(folder))
    assert "domestic dog" in wn.synonyms("dog")
    assert "film" in wn.synonyms("cinema") and "movie" in wn.synonyms("film")
    assert len(wn.index) > 140_000  # WordNet 3.0 has 147,306 lemma entries over the four parts of speech


# ---------------------------------------------------------------- operations

TEXT = "the story was good but the film was boring today"


def test_swap_keeps_the_words(tiny_wordnet):
    out = augment_one(tiny_wordnet, TEXT, {"op": "swap", "p": 1, "n": 2})
    assert out != TEXT.split() and Counter(out) == Counter(TEXT.split())
    assert augment_one(tiny_wordnet, TEXT, {"op": "swap", "p": 0, "n": 2}) == TEXT.split()


def test_delete_keeps_order_and_at_least_one_word(tiny_wordnet):
    out = augment_one(tiny_wordnet, TEXT, {"op": "delete", "p": 1, "rate": 0.5})
    assert 0 < len(out) < len(TEXT.split())
    it = iter(TEXT.split())
    assert all(w in it for w in out)  # a subsequence
    assert augment_one(tiny_wordnet, "word", {"op": "delete", "p": 1, "rate": 0.99}) == ["word"]


def test_synonym_replaces_one_word_keeping_case_and_punctuation(tiny_wordnet):
    out = augment_one(tiny_wordnet, "The Film, was good.", {"op": "synonym", "p": 1, "n": 1})
    changed = [(a, b) for a, b in zip("The Film, was good.".split(), out) if a != b]
    assert len(out) == 4 and len(changed) == 1
    assert changed[0] in {("Film,", "Movie,"), ("Film,", "Picture,"), ("Film,", "Celluloid,"), ("good.", "great.")}
    # stopwords and words without synonyms stay
    assert augment_one(tiny_wordnet, "the was but", {"op": "synonym", "p": 1, "n": 3}) == ["the", "was", "but"]


def test_insert_adds_a_synonym_of_a_word_of_the_text(tiny_wordnet):
    out = augment_one(tiny_wordnet, "a boring story", {"op": "insert", "p": 1, "n": 1})
    assert len(out) == 4
    (added,) = (Counter(out) - Counter(["a", "boring", "story"])).keys()
    assert added in {"dull", "tale"}


def test_augmentation_is_seeded_by_seed_epoch_and_example(tiny_wordnet):
    texts = [" ".join(r["text"].split()) for r in sentiment_rows(40)]
    spec = ({"op": "swap", "p": 0.5}, {"op": "delete", "p": 0.5, "rate": 0.3})
    run = lambda seed, epoch: Augmenter(ops(*spec), seed).augment([t.split() for t in texts], None, epoch)[0]  # noqa: E731
    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1) and run(0, 0) != run(1, 0)
    # example i's result does not depend on the others (a resume or a subset sees the same)
    first = Augmenter(ops(*spec), 0).augment([t.split() for t in texts[:10]], None, 0)[0]
    assert first == run(0, 0)[:10]


def test_ner_operations_keep_tags_aligned_and_entities_whole(tiny_wordnet):
    sentences = ner_sentences(60, seed=3)
    words, tags = [w for w, _ in sentences], [t for _, t in sentences]
    spec = ({"op": "synonym", "p": 1, "n": 3}, {"op": "insert", "p": 1, "n": 2}, {"op": "swap", "p": 1, "n": 3},
            {"op": "delete", "p": 1, "rate": 0.5})
    new_words, new_tags = Augmenter(ops(*spec), 0, tiny_wordnet).augment(words, tags, 0)
    changed = 0
    for w0, t0, w1, t1 in zip(words, tags, new_words, new_tags):
        assert len(w1) == len(t1)
        assert not tagging.to_spans(t1, "BIO")[1], "an I- tag after O or after another type"
        entities = lambda w, t: [(k, w[a:b]) for k, a, b in tagging.to_spans(t, "BIO")[0]]  # noqa: E731
        assert entities(w1, t1) == entities(w0, t0)  # every entity kept, whole, in order
        changed += w1 != w0
    assert changed > 50
    assert "paris" in {w for ws in new_words for w in ws}  # 'paris' has a synonym but is an entity: untouched


# ---------------------------------------------------------------- contextual replacement

@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory) -> Path:
    from transformers import BertForMaskedLM

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-mlm"), VOCAB, BertForMaskedLM)


def test_contextual_replacement_changes_only_the_chosen_word(tiny_mlm_dir):
    texts = [r["text"].split() for r in sentiment_rows(12)]
    spec = ops({"op": "contextual", "p": 1, "n": 1, "model": str(tiny_mlm_dir), "top_k": 5})
    out = Augmenter(spec, 0).augment(texts, None, 0)[0]
    assert out == Augmenter(spec, 0).augment(texts, None, 0)[0]  # deterministic
    whole_words = {w for w in VOCAB if w.isalpha()}
    for before, after in zip(texts, out):
        diff = [(a, b) for a, b in zip(before, after) if a != b]
        assert len(after) == len(before) and len(diff) == 1
        assert diff[0][1] in whole_words  # a whole word, not '##s', '[MASK]' or punctuation
    assert Augmenter(spec, 0).augment(texts, None, 1)[0] != out


def test_contextual_needs_a_masked_lm_head(tiny_model_dir):
    with pytest.raises(TunesmithError, match="has no trained masked-LM head"):
        Augmenter(ops({"op": "contextual", "p": 1, "model": str(tiny_model_dir)}), 0)


# ---------------------------------------------------------------- training, preview, bad input

def test_training_with_augmentation_turns_the_feature_cache_off(tiny_model_dir, sentiment_csv, tmp_path, capsys):
    cfg = tiny_config(tiny_model_dir, *sentiment_csv, tmp_path / "runs", epochs=2)
    cfg["strategy"] = {"name": "linear_probe"}
    cfg["augment"] = [{"op": "swap", "p": 0.5}]
    result = tunesmith.train(cfg)
    err = capsys.readouterr().err
    assert "feature cache off: augmentation changes the training inputs every epoch" in err
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["strategy"]["feature_cache"] is None
    assert summary["augment"] == [{"p": 0.5, "op": "swap", "n": 1}]


def test_ner_training_with_augmentation_and_class_weights(ner_model_dir, ner_files, tmp_path):  # noqa: F811
    cfg = ner_config(ner_model_dir, *ner_files, tmp_path / "runs", epochs=2)
    cfg["augment"] = [{"op": "swap", "p": 0.5}, {"op": "delete", "p": 0.3, "rate": 0.2}]
    cfg["imbalance"] = {"method": "class_weights", "weights": {"O": 0.5, "LOC": 2}}
    result = tunesmith.train(cfg)
    summary = json.loads((result.run_dir / "metrics.json").read_text())["imbalance"]
    assert summary["weights"] == {"O": 0.5, "B-LOC": 2.0, "I-LOC": 2.0, "B-PER": 1.0, "I-PER": 1.0}
    assert summary["distribution"]["train"]["O"] > summary["distribution"]["train"]["B-PER"] > 0
    assert result.metrics["f1"] > 0.5, result.metrics


def write_cfg(tmp_path, model_dir, extra: dict) -> Path:
    train = tmp_path / "train.csv"
    pd.DataFrame(sentiment_rows(60)).to_csv(train, index=False)
    base = tiny_config(model_dir, train, None, tmp_path / "runs", epochs=1)
    report = base.pop("report")  # last, so the line numbers the errors name stay those of the extra keys
    cfg = {**base, **extra, "report": report}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_preview_prints_original_and_augmented_pairs(tiny_model_dir, tmp_path, cli_env):
    path = write_cfg(tmp_path, tiny_model_dir, {"augment": [{"op": "swap", "p": 1.0, "n": 2}]})
    proc = subprocess.run(TUNESMITH + ["augment", "--preview", str(path), "--n", "3"], capture_output=True,
                          text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    originals = [line for line in proc.stdout.splitlines() if line.strip().startswith("original:")]
    augmented = [line for line in proc.stdout.splitlines() if line.strip().startswith("augmented:")]
    assert len(originals) == len(augmented) == 3
    for a, b in zip(originals, augmented):
        assert a.split(":", 1)[1].split() != b.split(":", 1)[1].split()
        assert sorted(a.split(":", 1)[1].split()) == sorted(b.split(":", 1)[1].split())
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("extra,expected", [
    ({"augment": [{"op": "swap", "p": 1.5}]}, "line 18: augment.0.p: Input should be less than or equal to 1"),
    ({"augment": [{"op": "shuffle", "p": 0.5}]}, "line 17: augment.0: 'op' must be one of swap, delete, insert, "
                                                 "synonym, contextual, random_resized_crop, flip, rotate, randaugment, "
                                                 "trivialaugment, mixup, cutmix (got 'shuffle')"),
    ({"augment": [{"op": "flip"}]}, "augment: 'flip' is for images, not task text_classification"),
    ({"augment": [{"op": "delete", "p": 0.5, "n": 2}]}, "line 19: unknown key 'augment.0.n'"),
    ({"imbalance": {"method": "class_weights", "weights": {"neg": -1}}},
     "line 18: imbalance.weights: weight of class 'neg' must be > 0 (got -1.0)"),
    ({"imbalance": {"method": "class_weights", "weights": {"neutral": 2}}},
     "cfg.yaml, line 18: imbalance.weights: unknown class 'neutral' (classes: neg, pos)"),
    ({"imbalance": {"method": "undersample"}}, "line 17: imbalance.method: Input should be 'none', 'class_weights'"),
    ({"imbalance": {"method": "oversample", "gamma": 1}}, "imbalance: gamma applies to method focal, not 'oversample'"),
])
def test_bad_imbalance_and_augment_settings(extra, expected, tmp_path, tiny_model_dir, capsys):
    path = write_cfg(tmp_path, tiny_model_dir, extra)
    code, err = run_cli(capsys, ["train", path])
    assert code == 2 and expected in error_line(err)
    assert not (tmp_path / "runs").exists()
