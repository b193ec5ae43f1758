"""task: causal_lm on a tiny random Llama written by save_pretrained (a word-level tokenizer with a ChatML-style
chat template whose end of turn is the eos token, as SmolLM2's): which positions carry loss, packing, LoRA
targets, train -> predict -> the same greedy text in plain transformers, bad inputs."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

import tunesmith
from conftest import NEGATIVE, NEUTRAL, POSITIVE, TUNESMITH
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.tasks import causal_lm
from tunesmith.tasks.base import IGNORE

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
VOCAB = SPECIAL + ["system", "user", "assistant", "yes", "no"] + POSITIVE + NEGATIVE + NEUTRAL
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def save_tiny_llama(folder: Path, chat_template: str | None = CHATML) -> Path:
    """A 2-layer, 32-wide random Llama (tied embeddings, like SmolLM2) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", bos_token="<|im_start|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         initializer_range=0.3)  # frozen tied embeddings of std 0.02 cap the logits near 0
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt: filler words with one sentiment word; completion: 'yes' for a positive one, 'no' otherwise."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(NEUTRAL, k=rng.randint(2, 8))
        positive = i % 2 == 0
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"prompt": " ".join(words), "completion": "yes" if positive else "no"})
    return rows


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _cfg(model: Path, train_file, out: Path | None = None, **sections) -> dict:
    cfg = {"task": "causal_lm", "model": {"name": str(model), "max_length": 64},
           "data": {"train": str(train_file), "validation_fraction": 0.2},
           "train": {"batch_size": 16, "lr": 2e-2, "warmup_ratio": 0.0, "seed": 0, "precision": "fp32",
                     "epochs": 10}, "output": {"dir": str(out or "runs")}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def _encoded(llama_dir: Path, rows: list[dict], train: bool = True, **lm):
    cfg = load_config(_cfg(llama_dir, "x", causal_lm=lm))
    model, processor = causal_lm.build_model(str(llama_dir), causal_lm.LMSpec(), cfg)
    examples = causal_lm.read_examples(rows, cfg, None, require_labels=True) if rows and "prompt" not in rows[0] \
        else causal_lm.read_examples(pd.DataFrame(rows), cfg, None)
    return model, processor, causal_lm.encode(processor, examples, cfg, train=train)


def _words(processor, ids: list[int]) -> list[str]:
    return processor.tokenizer.convert_ids_to_tokens(ids)


# ---------------------------------------------------------------- which positions carry loss

def test_only_the_completion_and_its_eos_carry_loss(llama_dir):
    _, processor, enc = _encoded(llama_dir, [{"prompt": "the film was good", "completion": "yes"}])
    feat = enc.features[0]
    words = _words(processor, feat["input_ids"])
    assert words == ["<|im_start|>", "user", "the", "film", "was", "good", "<|im_end|>", "<|im_start|>",
                     "assistant", "yes", "<|im_end|>"]
    learned = [w for w, label in zip(words, feat["labels"]) if label != IGNORE]
    assert learned == ["yes", "<|im_end|>"]  # eos learned although pad != eos ... and even where pad == eos
    assert [label for label in feat["labels"] if label != IGNORE] == feat["input_ids"][-2:]


def test_every_assistant_turn_of_a_chat_learns_and_nothing_else(llama_dir):
    chat = [{"role": "system", "content": "really"}, {"role": "user", "content": "good film"},
            {"role": "assistant", "content": "yes"}, {"role": "user", "content": "bad film"},
            {"role": "assistant", "content": "no"}]
    _, processor, enc = _encoded(llama_dir, [{"messages": chat}])
    feat = enc.features[0]
    words = _words(processor, feat["input_ids"])
    learned = [w for w, label in zip(words, feat["labels"]) if label != IGNORE]
    assert learned == ["yes", "<|im_end|>", "no", "<|im_end|>"]


def test_plain_format_appends_eos_and_completion_only_false_learns_the_prompt_too(llama_dir):
    row = [{"prompt": "the film was good", "completion": "yes"}]
    _, processor, enc = _encoded(llama_dir, row, format="plain")
    feat = enc.features[0]
    assert _words(processor, feat["input_ids"]) == ["the", "film", "was", "good", "yes", "<|im_end|>"]
    assert [label != IGNORE for label in feat["labels"]] == [False] * 4 + [True, True]
    _, _, enc = _encoded(llama_dir, row, format="plain", completion_only_loss=False)
    assert [label != IGNORE for label in enc.features[0]["labels"]] == [False] + [True] * 5  # not the first


def test_evaluation_prompt_is_what_training_read_before_the_answer(llama_dir):
    _, processor, enc = _encoded(llama_dir, [{"prompt": "the film was good", "completion": "yes"}], train=False)
    feat = enc.features[0]
    assert feat["prompt_ids"] == feat["input_ids"][:-2]
    assert processor.tokenizer.apply_chat_template([{"role": "user", "content": "the film was good"}],
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"] == feat["prompt_ids"]


# ---------------------------------------------------------------- packing

def test_packing_gives_the_loss_and_per_example_sums_of_the_unpacked_batch(llama_dir):
    rows = qa_rows(12, seed=3)
    model, processor, enc = _encoded(llama_dir, rows)
    model.eval()
    packed = causal_lm.lm_batches.collate(enc.features, processor.pad_id, True)
    padded = causal_lm.lm_batches.collate(enc.features, processor.pad_id, False)
    assert packed["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 12  # the batch in one row
    assert "attention_mask" not in packed
    assert model.config._attn_implementation == causal_lm.lm_batches.PACKED_ATTENTION
    with torch.no_grad():
        stats_packed, loss_packed = causal_lm.forward(model, packed)
        stats_padded, loss_padded = causal_lm.forward(model, padded)
    assert loss_packed.item() == pytest.approx(loss_padded.item(), rel=1e-5)
    assert torch.allclose(stats_packed, stats_padded, rtol=1e-4, atol=1e-5)
    assert stats_packed[:, 1].tolist() == [2.0] * 12  # each example: its answer word and eos
    # which positions carry loss in the packed rows: answer and eos of each example, never a row's first token
    # nor an example's first token (it would be trained on the previous example's last one)
    targets = packed["target_ids"]
    starts = packed["position_ids"] == 0
    assert (targets[starts] == IGNORE).all()
    carried = [processor.tokenizer.convert_ids_to_tokens(int(t)) for t in targets[targets != IGNORE]]
    assert sorted(set(carried)) == ["<|im_end|>", "no", "yes"] and len(carried) == 24


def test_packed_attention_gives_the_gradients_of_a_mask_over_the_row(llama_dir):
    """Attention example by example (lm_batches.PACKED_ATTENTION) against transformers' SDPA with the mask
    it builds from the restarting position ids: the same loss and the same gradient for every weight."""
    model, processor, enc = _encoded(llama_dir, qa_rows(9, seed=5))
    model.eval()  # no dropout: both passes must see the same arithmetic
    packed = causal_lm.lm_batches.collate(enc.features, processor.pad_id, True, multiple=16)  # a padding tail too
    assert packed["input_ids"].shape[1] % 16 == 0 and (packed["example_index"] == -1).any()

    def loss_and_grads(attention: str):
        model.set_attn_implementation(attention)
        model.zero_grad()
        _, loss = causal_lm.forward(model, packed)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours, ours_grads = loss_and_grads(causal_lm.lm_batches.PACKED_ATTENTION)
    theirs, their_grads = loss_and_grads("sdpa")
    assert ours == pytest.approx(theirs, rel=1e-5)
    assert ours_grads.keys() == their_grads.keys() and len(ours_grads) > 10
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, their_grads[name], rtol=1e-4, atol=1e-6), name


def test_language_models_take_random_batches_by_default(llama_dir):
    """group_by_length auto: a packed batch is one row (nothing to save by grouping), so causal_lm draws
    batches at random, as TRL does; every other task, and causal_lm without packing, groups."""
    lm = _cfg(llama_dir, "x")
    assert load_config(lm).groups_by_length() is False
    assert load_config({**lm, "causal_lm": {"packing": False}}).groups_by_length() is True
    assert load_config({**lm, "train": {**lm.get("train", {}), "group_by_length": True}}).groups_by_length() is True
    assert load_config({"data": {"train": "x.csv"}}).groups_by_length() is True


def test_packed_tokens_do_not_see_other_examples(llama_dir):
    """The logits of an example packed after another are those it gets alone."""
    model, processor, enc = _encoded(llama_dir, qa_rows(2, seed=4))
    model.eval()
    a, b = enc.features
    row = torch.tensor([a["input_ids"] + b["input_ids"]])
    positions = torch.tensor([list(range(len(a["input_ids"]))) + list(range(len(b["input_ids"])))])
    with torch.no_grad():
        together = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, len(a["input_ids"]):]
        alone = model(input_ids=torch.tensor([b["input_ids"]]), use_cache=False).logits[0]
    assert torch.allclose(together, alone, atol=1e-5)


# ---------------------------------------------------------------- LoRA

def test_lora_is_the_default_on_every_linear_layer_of_the_blocks(llama_dir):
    from tunesmith.strategies import apply_strategy

    cfg = load_config(_cfg(llama_dir, "x"))
    assert cfg.strategy.name == "lora"
    assert load_config({**_cfg(llama_dir, "x"), "strategy": {"name": "full"}}).strategy.name == "full"
    model, _ = causal_lm.build_model(str(llama_dir), causal_lm.LMSpec(), cfg)
    model, _ = apply_strategy(model, cfg, 10, 1e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[1] for n in trainable if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("lora_" in n for n in trainable)  # the tied LM head and the embeddings stay frozen


# ---------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained_run(llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-run")
    pd.DataFrame(qa_rows(240, seed=1)).to_json(root / "train.jsonl", orient="records", lines=True)
    pd.DataFrame(qa_rows(40, seed=2)).to_json(root / "test.jsonl", orient="records", lines=True)
    cfg = _cfg(llama_dir, root / "train.jsonl", root / "runs", output={"name": "run"},
               causal_lm={"max_new_tokens": 8})
    cfg["data"]["test"] = str(root / "test.jsonl")
    result = tunesmith.train(cfg)
    return result.run_dir


def test_lora_training_learns_to_stop(trained_run):
    """On this random 32-wide model LoRA learns the answer format and eos within 120 steps, not the sentiment
    (full fine-tuning does: tests/test_tasks.py asserts exact match 0.9 there)."""
    metrics = json.loads((trained_run / "metrics.json").read_text())
    setup = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["strategy"]["name"] == "lora" and setup["trainable_parameters"] == 8192
    # the summary counts what learned (the adapters), not the merged model's weights, all of which load trainable
    assert metrics["train"]["trainable_parameters"] == 8192 < metrics["train"]["total_parameters"]
    assert metrics["test"]["loss"] < 0.45, metrics["test"]  # a uniform guess: log(24) = 3.18 per token
    assert metrics["test"]["perplexity"] == pytest.approx(2.718281828459045 ** metrics["test"]["loss"], rel=1e-9)
    predictions = pd.read_csv(trained_run / "test_predictions.csv")
    assert set(predictions["generation"]) <= {"yes", "no"}  # one word, then eos: it stopped
    assert metrics["validation"]["target_tokens"] == 96 and "exact_match" in metrics["validation"]
    assert {"generation", "reference"} <= set(metrics["test"]["samples"][0])


def test_merged_model_generates_in_plain_transformers_what_predict_writes(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [r["prompt"] for r in qa_rows(12, seed=5)]
    frame = tunesmith.predict(trained_run, prompts, precision="fp32")
    model = AutoModelForCausalLM.from_pretrained(trained_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert "tunesmith" not in (trained_run / "model" / "config.json").read_text()  # the library's own attention
    assert model.config._attn_implementation != causal_lm.lm_batches.PACKED_ATTENTION
    for prompt, generated in zip(prompts, frame["generation"]):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        assert tokenizer.decode(out, skip_special_tokens=True).strip() == generated
    # the CLI: --text prints one JSON line per text; --input/--output writes a file
    proc = subprocess.run(TUNESMITH + ["predict", str(trained_run), "--text", prompts[0], "--text", prompts[1],
                                       "--max-new-tokens", "4"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [x["generation"] for x in lines] == list(frame["generation"][:2])
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    tunesmith.predict(trained_run, tmp_path / "in.jsonl", tmp_path / "out.jsonl", precision="fp32")
    out = pd.read_json(tmp_path / "out.jsonl", lines=True)
    assert list(out["generation"]) == list(frame["generation"])


def test_evaluate_scores_loss_and_generations(trained_run, tmp_path):
    rows = qa_rows(20, seed=6)
    pd.DataFrame(rows).to_csv(tmp_path / "eval.csv", index=False)
    metrics = tunesmith.evaluate(trained_run, tmp_path / "eval.csv", precision="fp32")
    generated = tunesmith.predict(trained_run, tmp_path / "eval.csv", precision="fp32")["generation"]
    assert metrics["exact_match"] == pytest.approx(sum(g == r["completion"] for g, r in zip(generated, rows)) / 20)
    assert metrics["token_f1"] == metrics["exact_match"]  # one-word answers
    assert metrics["target_tokens"] == 40 and metrics["loss"] < 0.45


# ---------------------------------------------------------------- bad input: one line each

@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "good film", "completion": " "}], "line 1, column 'completion': empty completion"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yes"}]}],
     "line 1, column 'messages': message 2 has unknown role 'bot' (expected system, user, assistant)"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "line 1, column 'messages': no assistant message"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
     "message 2 (assistant) has empty content"),
    ([{"question": "hi", "answer": "yes"}], "no 'prompt' + 'completion', 'messages' or 'text' column"),
])
def test_bad_rows_are_one_line_naming_file_line_and_column(llama_dir, tmp_path, rows, message):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(_cfg(llama_dir, tmp_path / "bad.jsonl"))
    with pytest.raises(TunesmithError, match="bad.jsonl") as err:
        causal_lm.read_examples(str(tmp_path / "bad.jsonl"), cfg, None)
    assert message in str(err.value)


def test_chat_records_need_a_chat_template(tmp_path):
    model = save_tiny_llama(tmp_path / "plain-model", chat_template=None)
    chats = [{"messages": [{"role": "user", "content": "good"}, {"role": "assistant", "content": "yes"}]}] * 20
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    with pytest.raises(TunesmithError) as err:  # the CLI prints it as one line, exit 2 (tests/test_tasks.py)
        tunesmith.train(_cfg(model, tmp_path / "chats.jsonl", tmp_path / "runs"))
    assert str(err.value) == (
        f"{tmp_path / 'chats.jsonl'}: model '{model}' has no chat template, and chat records (column "
        "'messages') need one; use prompt/completion columns with causal_lm.format: plain, or a model whose "
        "tokenizer has a chat template")
    assert not (tmp_path / "runs").exists()
    # prompt/completion rows on the same model fall back to plain text (format auto)
    rows = qa_rows(2)
    cfg = load_config(_cfg(model, "x"))
    _, processor = causal_lm.build_model(str(model), causal_lm.LMSpec(), cfg)
    enc = causal_lm.encode(processor, causal_lm.read_examples(pd.DataFrame(rows), cfg, None), cfg)
    assert processor.tokenizer.convert_ids_to_tokens(enc.features[0]["input_ids"][-2:]) == ["yes", "<|im_end|>"]


def test_texts_longer_than_the_limit_are_cut_and_counted(llama_dir):
    rows = [{"prompt": " ".join(["film"] * 40), "completion": "yes"}, {"prompt": "good", "completion": "yes"}]
    cfg = load_config(_cfg(llama_dir, "x"))
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"max_length": 20})})
    _, processor = causal_lm.build_model(str(llama_dir), causal_lm.LMSpec(), cfg)
    enc = causal_lm.encode(processor, causal_lm.read_examples(pd.DataFrame(rows), cfg, None), cfg, train=True)
    assert max(enc.lengths) == 20 and enc.truncated == 1
    assert causal_lm.describe_inputs(enc, cfg) == (
        "1 longer than 20 tokens (model.max_length or the model's context), cut there (their completions lose "
        "their end); 1 kept no token to learn")
    with pytest.raises(TunesmithError, match="no example keeps a token to learn within model.max_length 20"):
        causal_lm.encode(processor, causal_lm.read_examples(pd.DataFrame(rows[:1]), cfg, None), cfg, train=True)


def test_config_refuses_what_causal_lm_cannot_do(llama_dir):
    with pytest.raises(TunesmithError, match="augmentation is not available for task causal_lm"):
        load_config({**_cfg(llama_dir, "x"), "augment": [{"op": "swap"}]})
    with pytest.raises(TunesmithError, match="train.metric exact_match scores generations: it needs causal_lm.eval_"):
        load_config(_cfg(llama_dir, "x", train={"metric": "exact_match"}, causal_lm={"eval_generate": False}))
    with pytest.raises(TunesmithError, match="causal_lm.top_p"):
        load_config(_cfg(llama_dir, "x", causal_lm={"top_p": 0}))


# ---------------------------------------------------------------- catalog builders (small stand-in wheels)

def test_chatterbot_and_chitchat_builders(tmp_path):
    import zipfile

    from tunesmith import catalog

    bot = tmp_path / "bot.whl"
    with zipfile.ZipFile(bot, "w") as zf:
        zf.writestr("chatterbot_corpus/data/english/greetings.yml",
                    "categories: [greetings]\nconversations:\n- - Hello\n  - Hi\n  - How are you?\n- - Bye\n  - See you\n")
        zf.writestr("chatterbot_corpus/data/french/x.yml", "conversations:\n- - Bonjour\n  - Salut\n")
    (tmp_path / "bot").mkdir()
    catalog._build_chatterbot([bot], tmp_path / "bot")
    pairs = pd.concat(pd.read_json(tmp_path / "bot" / f"{s}.jsonl", lines=True)
                      for s in ("train", "validation", "test") if (tmp_path / "bot" / f"{s}.jsonl").stat().st_size)
    assert sorted(zip(pairs["prompt"], pairs["completion"])) == [("Bye", "See you"), ("Hello", "Hi"),
                                                                 ("Hi", "How are you?")]
    chat = tmp_path / "chat.whl"
    msg = lambda text, who: {"text": text, "sender": who, "timestamp": "t"}  # noqa: E731
    data = {"a": {"messages": [[msg("hi", "u1"), msg("there", "u1")], [msg("hello", "u2")], [msg("bye", "u1")]]},
            "b": {"messages": [[msg("alone", "u1")]]}}
    with zipfile.ZipFile(chat, "w") as zf:
        zf.writestr("chitchat_dataset/dataset.json", json.dumps(data))
    (tmp_path / "chat").mkdir()
    catalog._build_chitchat([chat], tmp_path / "chat")
    chats = [json.loads(line) for s in ("train", "validation", "test")
             for line in (tmp_path / "chat" / f"{s}.jsonl").read_text().splitlines() if line.strip()]
    assert chats == [{"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                                   {"role": "user", "content": "bye"}], "id": "a"}]
