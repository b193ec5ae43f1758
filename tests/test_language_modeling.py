"""task: language_modeling: packing, MLM masking statistics, the loss against transformers' own, a fresh
MLM head on an encoder-only folder, CLM on tiny GPT-2 and Llama models, the output folder as a classifier's
model.name, and one-line errors for bad input. (Train, evaluate, predict, kill and resume: test_tasks.py.)"""

from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import tunesmith
from conftest import NEGATIVE, POSITIVE, TUNESMITH, VOCAB, save_tiny_bert, sentiment_rows
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.tasks import language_modeling as lm
from tunesmith.tasks.base import IGNORE

TRAIN = {"batch_size": 16, "warmup_ratio": 0.0, "seed": 0, "precision": "fp32"}


def lm_texts(n: int, seed: int = 0) -> list[str]:
    """Sentences with a learnable pattern: 'the <pos word> film was good' / '... bad'."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        good = i % 2 == 0
        word = rng.choice(POSITIVE if good else NEGATIVE)
        out.append(f"the {word} movie was {'good' if good else 'bad'} and the story was {word} .")
    return out


def save_tiny_decoder(folder: Path, kind: str = "gpt2") -> Path:
    """A 2-layer random GPT-2 or Llama with a small byte-level BPE tokenizer trained on the test corpus
    (end-of-text token; Llama's adds <s> before each text, as Llama tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<s>"]
    tok.train_from_iterator(lm_texts(200) + [r["text"] for r in sentiment_rows(200)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<s>" if kind == "llama" else None)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=2,
                                           n_positions=64, eos_token_id=0, bos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=64, eos_token_id=0, bos_token_id=1))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def lm_config(model: Path, train_file: Path, out: Path, **extra) -> dict:
    cfg = {"task": "language_modeling", "model": {"name": str(model), "max_length": 32},
           "data": {"train": str(train_file), "validation_fraction": 0.2},
           "train": {**TRAIN, "lr": 3e-3, "epochs": 4}, "output": {"dir": str(out)}}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    (root / "train.txt").write_text("\n".join(lm_texts(300)) + "\n")
    pd.DataFrame({"text": lm_texts(40, seed=5)}).to_csv(root / "test.csv", index=False)
    return root


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-lm"), VOCAB)


def _processor(model_dir: Path, objective: str = "mlm"):
    cfg = load_config(lm_config(model_dir, Path("x.txt"), Path("out")))
    return lm.build_model(str(model_dir), lm.Objective(objective), cfg)


# ---------------------------------------------------------------- packing and masking

def test_pack_joins_texts_and_wraps_each_block_in_special_tokens(bert_dir):
    _, proc = _processor(bert_dir)
    tok = proc.tokenizer
    texts = ["the movie was good", "a film with music", "it was dull"]
    blocks = lm.pack(tok, texts, block=8, objective="mlm")
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert all(len(b) == 8 for b in blocks[:-1]) and 3 <= len(blocks[-1]) <= 8
    assert all(b[0] == cls and b[-1] == sep for b in blocks)
    inner = [t for b in blocks for t in b[1:-1]]  # every token once, in order, [SEP] between texts
    words = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert inner == words[0] + [sep] + words[1] + [sep] + words[2]


def test_masking_statistics_15_percent_then_80_10_10():
    ids = torch.randint(10, 1000, (400, 256))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, :8] = False  # e.g. special tokens
    inputs, targets = lm.mask_tokens(ids, maskable, mask_id=3, vocab_size=1000, probability=0.15,
                                     generator=torch.Generator().manual_seed(0))
    chosen = targets != IGNORE
    n = maskable.sum().item()
    assert chosen.sum().item() / n == pytest.approx(0.15, abs=0.005)  # 99,200 candidates: sd 0.0011
    assert not chosen[:, :8].any() and torch.equal(inputs[:, :8], ids[:, :8])
    assert torch.equal(targets[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    as_mask = (inputs[chosen] == 3).float().mean().item()
    unchanged = (inputs[chosen] == ids[chosen]).float().mean().item()
    replaced = 1 - as_mask - unchanged
    assert as_mask == pytest.approx(0.8, abs=0.01)  # about 14,900 chosen tokens: sd 0.0033
    assert replaced == pytest.approx(0.1, abs=0.01)
    assert unchanged == pytest.approx(0.1, abs=0.01)


def test_collate_never_masks_special_or_padding_tokens(bert_dir):
    _, proc = _processor(bert_dir)
    tok = proc.tokenizer
    enc = lm.encode(proc, lm.Examples(None, [r["text"] for r in sentiment_rows(200)]), load_config(
        lm_config(bert_dir, Path("x.txt"), Path("out"))), train=True)
    assert enc.inputs_vary  # masked per batch: the loop must not cache frozen features
    collate = lm.make_collate(proc, 1)
    torch.manual_seed(0)
    special = torch.as_tensor(sorted(set(tok.all_special_ids)))
    chosen_total = candidates = 0
    for start in range(0, len(enc.features), 7):  # batches with a short last block: padding present
        feats = enc.features[start:start + 7] + [{"input_ids": enc.features[start]["input_ids"][:5]}]
        batch = collate(feats)
        original = lm.text.pad_batch(feats, tok.pad_token_id)["input_ids"]
        fixed = torch.isin(original, special) | (batch["attention_mask"] == 0)
        assert (batch["targets"][fixed] == IGNORE).all() and torch.equal(batch["input_ids"][fixed], original[fixed])
        chosen_total += (batch["targets"] != IGNORE).sum().item()
        candidates += (~fixed).sum().item()
    assert 0.10 < chosen_total / candidates < 0.20


def test_validation_masks_are_fixed_and_training_masks_change(bert_dir):
    _, proc = _processor(bert_dir)
    cfg = load_config(lm_config(bert_dir, Path("x.txt"), Path("out")))
    examples = lm.Examples(None, lm_texts(50))
    first, second = lm.encode(proc, examples, cfg), lm.encode(proc, examples, cfg)
    assert [f["targets"] for f in first.features] == [f["targets"] for f in second.features]
    collate = lm.make_collate(proc, 1)
    train = lm.encode(proc, examples, cfg, train=True).features[:8]
    assert not torch.equal(collate(train)["targets"], collate(train)["targets"])


# ---------------------------------------------------------------- the loss equals transformers' own

def test_mlm_loss_equals_the_models_own_loss(bert_dir):
    model, proc = _processor(bert_dir)
    model.eval()
    cfg = load_config(lm_config(bert_dir, Path("x.txt"), Path("out")))
    enc = lm.encode(proc, lm.Examples(None, lm_texts(40)), cfg)
    batch = lm.make_collate(proc, 1)(enc.features[:6])
    outputs, loss = lm.forward(model, batch)  # the head on masked positions only
    own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["targets"]).loss
    assert loss.item() == pytest.approx(own.item(), rel=1e-5)
    assert outputs[:, 1].sum().item() == (batch["targets"] != IGNORE).sum().item()
    assert (outputs[:, 0].sum() / outputs[:, 1].sum()).item() == pytest.approx(own.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_clm_targets_are_the_next_token_and_the_loss_is_the_models_own(kind, tmp_path):
    folder = save_tiny_decoder(tmp_path / kind, kind)
    model, proc = _processor(folder, "clm")
    model.eval()
    cfg = load_config(lm_config(folder, Path("x.txt"), Path("out")))
    enc = lm.encode(proc, lm.Examples(None, lm_texts(30)), cfg)
    assert not enc.inputs_vary
    if kind == "llama":  # the tokenizer's own <s> opens every block
        assert all(f["input_ids"][0] == proc.tokenizer.bos_token_id for f in enc.features)
    feats = enc.features[:3] + [{"input_ids": enc.features[3]["input_ids"][:6]}]  # a short one: padding
    batch = lm.make_collate(proc, 1)(feats)
    ids, targets, real = batch["input_ids"], batch["targets"], batch["attention_mask"].bool()
    assert torch.equal(targets[0, :-1], ids[0, 1:]) and targets[0, -1] == IGNORE
    assert (targets[3, 5:] == IGNORE).all() and torch.equal(targets[3, :5], ids[3, 1:6])
    eos = proc.tokenizer.eos_token_id
    assert (targets == eos).any()  # the end of a text is learned (pad == eos must not hide it)
    _, loss = lm.forward(model, batch)
    own = model(input_ids=ids, attention_mask=batch["attention_mask"],
                labels=torch.where(real, ids, IGNORE)).loss
    assert loss.item() == pytest.approx(own.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_clm_trains_a_tiny_decoder(kind, tmp_path, corpus):
    folder = save_tiny_decoder(tmp_path / kind, kind)
    result = tunesmith.train(lm_config(folder, corpus / "train.txt", tmp_path / "runs",
                                       data={"test": str(corpus / "test.csv")}, train={"lr": 1e-2, "epochs": 6}))
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    uniform = math.log(300)  # the tokenizer's 300 tokens, equally likely: 5.70
    assert summary["test"]["loss"] < uniform - 2.0, summary["test"]
    assert summary["test"]["perplexity"] == pytest.approx(np.exp(summary["test"]["loss"]))
    info = json.loads((result.run_dir / "model" / "tunesmith.json").read_text())
    assert info["labels"] == {"objective": "clm"}
    from transformers import AutoModelForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(result.run_dir / "model")).__name__.lower().startswith(kind)


# ---------------------------------------------------------------- mlm from an encoder-only folder

def test_fresh_mlm_head_tied_and_the_folder_pooler_kept(bert_dir):
    model, _ = _processor(bert_dir)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    from safetensors.torch import load_file
    saved = load_file(str(bert_dir / "model.safetensors"))
    assert torch.equal(model.bert.pooler.dense.weight, saved["pooler.dense.weight"])
    assert torch.equal(model.bert.encoder.layer[1].output.dense.weight, saved["encoder.layer.1.output.dense.weight"])


def test_mlm_output_folder_fine_tunes_as_a_classifier(bert_dir, corpus, tmp_path):
    result = tunesmith.train(lm_config(bert_dir, corpus / "train.txt", tmp_path / "runs",
                                       data={"test": str(corpus / "test.csv")}))
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["test"]["loss"] < math.log(len(VOCAB)) - 0.5, summary["test"]  # uniform guess: ln(37) = 3.61
    folder = result.run_dir / "model"

    # plain transformers: the encoder and pooler load, only the classifier is new, only the MLM head is unused
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification
    clf, info = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}, info
    assert info["unexpected_keys"] and all(k.startswith("cls.") for k in info["unexpected_keys"]), info
    trained = load_file(str(folder / "model.safetensors"))
    for name, tensor in clf.bert.state_dict().items():
        assert torch.equal(tensor, trained[f"bert.{name}"]), name

    # an ordinary classification config with model.name: the LM run's model/
    train_csv, test_csv = tmp_path / "train.csv", tmp_path / "test.csv"
    pd.DataFrame(sentiment_rows(240, seed=1)).to_csv(train_csv, index=False)
    pd.DataFrame(sentiment_rows(60, seed=2)).to_csv(test_csv, index=False)
    clf_result = tunesmith.train({"model": {"name": str(folder), "max_length": 32},
                                  "data": {"train": str(train_csv), "test": str(test_csv)},
                                  "train": {**TRAIN, "lr": 2e-3, "epochs": 4}, "output": {"dir": str(tmp_path / "clf")}})
    assert clf_result.metrics["accuracy"] >= 0.9


def test_frozen_bottom_trains_without_a_feature_cache_under_mlm(bert_dir, corpus, tmp_path, capsys):
    cfg = lm_config(bert_dir, corpus / "train.txt", tmp_path / "runs", strategy={"name": "freeze", "freeze_layers": 1},
                    train={"epochs": 1})
    tunesmith.train(cfg)
    assert "feature cache off: the training inputs are drawn anew for every batch" in capsys.readouterr().err


def test_evaluate_and_predict_a_text_file(bert_dir, corpus, tmp_path):
    result = tunesmith.train(lm_config(bert_dir, corpus / "train.txt", tmp_path / "runs", train={"epochs": 1}))
    (tmp_path / "more.txt").write_text("\n".join(lm_texts(20, seed=9)))
    first = tunesmith.evaluate(result.run_dir, tmp_path / "more.txt", precision="fp32")
    again = tunesmith.evaluate(result.run_dir, tmp_path / "more.txt", precision="fp32")
    assert first == again and first["predicted_tokens"] > 0  # fixed evaluation masks
    frame = tunesmith.predict(result.run_dir, tmp_path / "more.txt", precision="fp32")
    assert list(frame.columns) == ["block", "predicted_tokens", "loss", "perplexity"]
    assert (frame["loss"] * frame["predicted_tokens"]).sum() / frame["predicted_tokens"].sum() == \
        pytest.approx(first["loss"], rel=1e-4)


def test_catalog_text_leaves_out_every_test_film():
    from tunesmith import catalog
    films = [f"film {i}" for i in range(60)]
    test_films = [f for f in films if catalog.film_is_test(f)]
    train_film = next(f for f in films if not catalog.film_is_test(f))
    raw = pd.DataFrame({"category": ["plot", "fresh", "rotten", "plot", "fresh", "fresh"],
                        "text": ["a synopsis", "great fun", "shared snippet", None, "test review", "shared snippet"],
                        "movie_name": [train_film, train_film, train_film, train_film, test_films[0], test_films[1]]})
    out = catalog.rotten_tomatoes_text(raw)
    assert out["text"].tolist() == ["a synopsis", "great fun"]  # no missing text, nothing seen under a test film
    assert out["kind"].tolist() == ["plot", "review"] and set(out.columns) == {"text", "film", "kind"}


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def test_bad_inputs_are_one_line_each(bert_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    pd.DataFrame({"review": lm_texts(30)}).to_csv(tmp_path / "other.csv", index=False)
    pd.DataFrame({"text": ["a film", " ", "more"]}).to_csv(tmp_path / "hole.csv", index=False)
    gpt2 = save_tiny_decoder(tmp_path / "gpt2")
    good = tmp_path / "good.txt"
    good.write_text("\n".join(lm_texts(30)))
    cases = [
        (lm_config(bert_dir, tmp_path / "empty.txt", tmp_path / "runs"), "empty.txt: file is empty"),
        (lm_config(bert_dir, tmp_path / "blank.txt", tmp_path / "runs"), "blank.txt: no text (only blank lines)"),
        (lm_config(bert_dir, tmp_path / "other.csv", tmp_path / "runs"),
         "other.csv: no text column 'text' (columns: review)"),
        (lm_config(bert_dir, tmp_path / "hole.csv", tmp_path / "runs"), "hole.csv, line 3, column 'text': empty text"),
        (lm_config(gpt2, good, tmp_path / "runs", language_modeling={"objective": "mlm"}),
         "(gpt2) has no masked-LM form in transformers, so objective mlm is not possible"),
        (lm_config(bert_dir, good, tmp_path / "runs", language_modeling={"objective": "clm"}),
         "(bert) is not a left-to-right decoder, so objective clm is not possible"),
        ({**lm_config(bert_dir, good, tmp_path / "runs"), "augment": [{"op": "swap", "p": 0.5}]},
         "task language_modeling takes no augment or imbalance settings"),
    ]
    for cfg, expected in cases:
        with pytest.raises(TunesmithError) as err:
            tunesmith.train(cfg)
        assert expected in str(err.value) and "\n" not in str(err.value), (expected, str(err.value))
    assert not (tmp_path / "runs").exists()  # nothing written


def test_cli_bad_input_is_one_line_exit_2(bert_dir, tmp_path, cli_env):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(lm_config(bert_dir, tmp_path / "empty.txt", tmp_path / "runs")))
    proc = subprocess.run(TUNESMITH + ["train", str(tmp_path / "cfg.yaml")], capture_output=True, text=True,
                          env=cli_env, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'empty.txt'}: file is empty"
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_real_minilm_mlm_head_learns_on_rotten_tomatoes_text(tmp_path):
    """The real MiniLM (encoder only in its package) with a new MLM head, on real in-domain text: the
    validation loss falls well below a uniform guess over the vocabulary (ln 30,522 = 10.3) and keeps falling."""
    from tunesmith import catalog
    texts = pd.read_csv(catalog.dataset_path("rotten_tomatoes_text") / "train.csv").sample(400, random_state=0)
    texts.to_csv(tmp_path / "text.csv", index=False)
    result = tunesmith.train({
        "task": "language_modeling", "model": {"name": "minilm-l6", "max_length": 64},
        "data": {"train": str(tmp_path / "text.csv"), "group_column": "film", "validation_fraction": 0.1},
        "train": {"max_steps": 16, "batch_size": 8, "lr": 1e-4, "eval_every_steps": 8, "seed": 0,
                  "early_stopping_patience": None},
        "output": {"dir": str(tmp_path / "runs")}})
    evals = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["validation"]["loss"] for e in evals if e.get("type") == "eval"]
    assert losses[1] < losses[0] < math.log(30522) - 1.5, losses
    from transformers import AutoModelForSequenceClassification
    _, info = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "model", num_labels=2,
                                                                 output_loading_info=True)
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}, info


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_texts_from_jsonl_parquet_and_txt(suffix, tmp_path):
    texts = lm_texts(5)
    path = tmp_path / f"corpus{suffix}"
    frame = pd.DataFrame({"body": texts, "id": range(5)})
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("\n\n".join(texts) + "\n")  # blank lines between texts are skipped
    cfg = load_config({"task": "language_modeling", "data": {"train": str(path), "text_column": "body"}})
    examples = lm.read_examples(str(path), cfg, None)
    assert examples.texts == texts
    if suffix == ".txt":
        assert examples.table.where(1, "body") == f"{path}, line 3, column 'body'"
