"""Fine-tuning strategies on the tiny random BERT: which parameters learn, at which learning rate,
when gradual unfreezing opens each layer (also across a resume), LoRA saving, and cached frozen
features giving the same results as running the frozen blocks."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith
from conftest import sentiment_rows, tiny_config
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.features import build_feature_cache
from tunesmith.models import first_token_only
from tunesmith.strategies import apply_strategy, find_layout, optimizer_groups, set_train_mode, unfreeze_due

LAYERS = ("embeddings", "layer.0", "layer.1", "head")  # the tiny BERT, bottom to top


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    pd.DataFrame(sentiment_rows(64, seed=3)).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(40, seed=4)).to_csv(folder / "test.csv", index=False)
    return folder


def _config(tiny_model_dir, data, tmp_path, strategy: dict, validation: bool = False, **train) -> dict:
    train = {"batch_size": 8, "lr": 1e-2, "checkpoint_every_steps": 1, "keep_checkpoints": True, **train}
    cfg = tiny_config(tiny_model_dir, data / "train.csv", data / "test.csv", tmp_path / "runs", **train)
    cfg["data"]["validation_fraction"] = 0.2 if validation else 0.0
    cfg["strategy"] = strategy
    return cfg


def _layer_of(name: str) -> str:
    """Our names for the tiny BERT's parameters (checked against find_layout below)."""
    if name.startswith("bert.encoder.layer."):
        return "layer." + name.split(".")[3]
    if name.startswith("bert.") and "pooler" not in name:
        return "embeddings"
    return "head"


def _checkpoint(run, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def _changed_layers(before: dict, after: dict) -> dict[str, set[bool]]:
    """For each layer: the set of 'did this parameter change' answers (so {True} = all changed)."""
    out: dict[str, set[bool]] = {}
    for name, value in after.items():
        out.setdefault(_layer_of(name), set()).add(not torch.equal(before[name], value))
    return out


@pytest.mark.parametrize("strategy,learning", [
    ({"name": "full"}, LAYERS),
    ({"name": "full", "layerwise_lr_decay": 0.5}, LAYERS),
    ({"name": "freeze", "freeze_layers": 1}, ("layer.1", "head")),
    ({"name": "freeze", "freeze_layers": -1, "freeze_embeddings": False}, ("embeddings", "layer.1", "head")),
    ({"name": "freeze", "freeze_layers": 0.5, "cache_features": "off"}, ("layer.1", "head")),
    ({"name": "freeze", "freeze_layers": 0}, ("layer.0", "layer.1", "head")),
    ({"name": "linear_probe"}, ("head",)),
    ({"name": "gradual_unfreeze", "unfreeze_every_steps": 100}, ("head",)),
    ({"name": "gradual_unfreeze", "unfreeze_every_steps": 2}, ("layer.0", "layer.1", "head")),
], ids=lambda x: json.dumps(x) if isinstance(x, dict) else None)
def test_exactly_the_configured_parameters_change(strategy, learning, tiny_model_dir, data, tmp_path):
    result = tunesmith.train(_config(tiny_model_dir, data, tmp_path, strategy, max_steps=5))
    run = result.run_dir
    changed = _changed_layers(_checkpoint(run, 4), _checkpoint(run, 5))  # the 5th optimizer step
    assert changed == {layer: {layer in learning} for layer in LAYERS}
    # frozen layers also still hold the pretrained weights after all five steps
    pretrained = load_file(tiny_model_dir / "model.safetensors")
    final = _checkpoint(run, 5)
    for name, value in final.items():
        if _layer_of(name) not in learning and _layer_of(name) != "head":
            assert torch.equal(pretrained[name.removeprefix("bert.")], value), name
    summary = json.loads((run / "metrics.json").read_text())["strategy"]
    assert summary["trainable_parameters"] == sum(v.numel() for n, v in final.items() if _layer_of(n) in learning)
    assert summary["total_parameters"] == sum(v.numel() for v in final.values())
    assert summary["seconds_per_epoch"] > 0


def test_frozen_modules_run_in_eval_mode(tiny_model_dir, data, tmp_path):
    model, _ = _built(tiny_model_dir, data, tmp_path, {"name": "freeze", "freeze_layers": 1})
    set_train_mode(model)
    assert not model.bert.embeddings.training and not model.bert.encoder.layer[0].output.dropout.training
    assert model.bert.encoder.layer[1].output.dropout.training and model.dropout.training
    # BatchNorm statistics of a frozen part do not move in training mode
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    net[0].requires_grad_(False)
    set_train_mode(net)
    net(torch.randn(8, 3) * 5 + 2)
    assert torch.equal(net[0].running_mean, torch.zeros(3)) and net[1].training


def _built(tiny_model_dir, data, tmp_path, strategy: dict, steps_per_epoch: int = 8):
    from tunesmith.tasks import text_classification as task

    cfg = load_config(_config(tiny_model_dir, data, tmp_path, strategy))
    labels = task.LabelSpace("single_label", ["neg", "pos"])
    model, tokenizer = task.build_model(str(tiny_model_dir), labels, cfg)
    model, plan = apply_strategy(model, cfg, steps_per_epoch, cfg.train.lr)
    return model, plan


def test_layout_names_the_tiny_bert_layers(tiny_model_dir, data, tmp_path):
    model, plan = _built(tiny_model_dir, data, tmp_path, {"name": "full"})
    assert plan.layout.num_blocks == 2
    assert plan.layout.layer_of == {name: _layer_of(name) for name, _ in model.named_parameters()}


def test_learning_rate_per_group_is_lr_times_decay_to_depth(tiny_model_dir, data, tmp_path):
    decay, lr = 0.8, 1e-2
    model, plan = _built(tiny_model_dir, data, tmp_path, {"name": "full", "layerwise_lr_decay": decay})
    depth = {"head": 0, "layer.1": 1, "layer.0": 2, "embeddings": 3}
    groups = optimizer_groups(model, plan)
    assert [g["name"] for g in groups][:2] == ["head/decay", "head/no_decay"]
    for group in groups:
        layer, _, kind = group["name"].partition("/")
        assert group["lr"] == pytest.approx(lr * decay ** depth[layer])
        assert group["weight_decay"] == (0.0 if kind == "no_decay" else 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["name"].endswith("no_decay") for p in g["params"]}
    assert "bert.embeddings.LayerNorm.weight" in no_decay and "classifier.bias" in no_decay
    assert "classifier.weight" not in no_decay
    assert sum(len(g["params"]) for g in groups) == len(names)

    # through train(): saved in metrics.json and metrics.jsonl, and the optimizer really used them
    # (constant schedule without warm-up: the LR in use is the base LR)
    strategy = {"name": "freeze", "freeze_layers": 1, "layerwise_lr_decay": decay}
    run = tunesmith.train(_config(tiny_model_dir, data, tmp_path, strategy, max_steps=2, scheduler="constant")).run_dir
    expected = [{"name": "head", "lr": pytest.approx(lr)}, {"name": "layer.1", "lr": pytest.approx(lr * decay)}]
    saved = json.loads((run / "metrics.json").read_text())["strategy"]["param_groups"]
    assert [{"name": g["name"], "lr": g["lr"]} for g in saved] == expected
    setup = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert setup["type"] == "setup" and [g["lr"] for g in setup["param_groups"]] == [g["lr"] for g in saved]
    opt = torch.load(run / "checkpoints" / "step-0000002" / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in opt["param_groups"]] == pytest.approx([lr, lr, lr * decay, lr * decay])


def test_unfreeze_points(tiny_model_dir, data, tmp_path):
    _, plan = _built(tiny_model_dir, data, tmp_path, {"name": "gradual_unfreeze", "unfreeze_every_epochs": 0.5,
                                                      "freeze_embeddings": False}, steps_per_epoch=8)
    assert plan.every_steps == 4
    assert [unfreeze_due(plan, s) for s in (3, 4, 5)] == [[], ["layer.1"], ["layer.1"]]
    assert unfreeze_due(plan, 12) == ["layer.1", "layer.0", "embeddings"]


def test_gradual_unfreezing_events_and_resume(tiny_model_dir, data, tmp_path):
    """Unfreeze layer.1, layer.0, embeddings after steps 3, 6, 9; a resume from the step-8 checkpoint
    (two layers open) opens the embeddings at step 9 again and ends with the same weights."""
    strategy = {"name": "gradual_unfreeze", "unfreeze_every_steps": 3, "freeze_embeddings": False,
                "layerwise_lr_decay": 0.5}
    cfg = _config(tiny_model_dir, data, tmp_path, strategy, max_steps=10, checkpoint_every_steps=4)
    run = tunesmith.train(cfg).run_dir
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    unfreezes = [(e["step"], e["layer"], e["lr"]) for e in events if e["type"] == "unfreeze"]
    assert unfreezes == [(3, "layer.1", 5e-3), (6, "layer.0", 2.5e-3), (9, "embeddings", 1.25e-3)]

    copy = tmp_path / "resumed"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-0000010")  # as if killed after the step-8 checkpoint
    (copy / "metrics.json").unlink()
    tunesmith.train(None, resume=copy)
    resumed = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [(e["type"], e["step"]) for e in resumed] == [(e["type"], e["step"]) for e in events]
    assert [e for e in resumed if e["type"] == "unfreeze"] == [e for e in events if e["type"] == "unfreeze"]
    want, got = load_file(run / "model" / "model.safetensors"), load_file(copy / "model" / "model.safetensors")
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    assert not torch.equal(want["bert.embeddings.word_embeddings.weight"],
                           load_file(tiny_model_dir / "model.safetensors")["embeddings.word_embeddings.weight"])


def test_merged_lora_loads_in_plain_transformers_with_same_predictions(tiny_model_dir, data, tmp_path):
    """The merged folder (plain transformers) predicts what the unmerged adapter on its base predicts."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    runs = {}
    for save in ("merged", "adapter"):
        strategy = {"name": "lora", "lora": {"r": 4, "save": save}}
        runs[save] = tunesmith.train(_config(tiny_model_dir, data, tmp_path, strategy, max_steps=6)).run_dir
    merged_dir, adapter_dir = runs["merged"] / "model", runs["adapter"] / "model"
    assert not (merged_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_config.json").exists()

    texts = pd.read_csv(data / "test.csv")["text"].tolist()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    unmerged = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        plain_logits, peft_logits = plain(**batch).logits, unmerged(**batch).logits
    assert torch.allclose(plain_logits, peft_logits, atol=1e-5)
    # LoRA changed the attention weights (so the comparison is not trivially base vs base)
    pretrained = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(merged_dir / "model.safetensors")
    assert not torch.allclose(merged["bert.encoder.layer.0.attention.self.query.weight"],
                              pretrained["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(merged["bert.encoder.layer.0.attention.self.key.weight"],
                       pretrained["encoder.layer.0.attention.self.key.weight"])
    # tunesmith predict reads both folders the same way
    for run in runs.values():
        probs = tunesmith.predict(run, data / "test.csv", precision="fp32")[["prob_neg", "prob_pos"]].to_numpy()
        assert np.allclose(probs, plain_logits.softmax(-1).numpy(), atol=1e-5)


@pytest.mark.parametrize("strategy", [{"name": "linear_probe"}, {"name": "freeze", "freeze_layers": 1}],
                         ids=["linear_probe", "freeze"])
def test_cached_features_give_the_same_results(strategy, tiny_model_dir, data, tmp_path):
    results = {}
    for cache in ("auto", "off"):
        cfg = _config(tiny_model_dir, data, tmp_path, {**strategy, "cache_features": cache}, validation=True,
                      epochs=3, checkpoint_every_steps=100)
        results[cache] = tunesmith.train(cfg)
    cached, plain = results["auto"].run_dir, results["off"].run_dir
    assert json.loads((cached / "metrics.json").read_text())["strategy"]["feature_cache"]["frozen_blocks"] >= 1
    assert json.loads((plain / "metrics.json").read_text())["strategy"]["feature_cache"] is None
    assert results["auto"].metrics["accuracy"] == results["off"].metrics["accuracy"]
    assert results["auto"].metrics["macro_f1"] == results["off"].metrics["macro_f1"]
    a, b = pd.read_csv(cached / "test_predictions.csv"), pd.read_csv(plain / "test_predictions.csv")
    assert np.abs(a["prob_pos"] - b["prob_pos"]).max() < 1e-4
    trained, reference = (load_file(run / "model" / "model.safetensors") for run in (cached, plain))
    assert all(torch.allclose(v, reference[k], atol=1e-4) for k, v in trained.items())
    # training did move the model (so the match is not two untouched heads)
    losses = [json.loads(x).get("validation", {}).get("loss") for x in (plain / "metrics.jsonl").read_text().splitlines()]
    assert len([v for v in losses if v is not None]) == 3  # (the last steps, at lr near 0, may move it < 1e-4)
    assert len({round(v, 4) for v in losses if v is not None}) >= 2


def _tiny_models():
    from transformers import (BertConfig, DistilBertConfig, MPNetConfig, RobertaConfig,
                              AutoModelForSequenceClassification)
    common = dict(vocab_size=60, max_position_embeddings=64, num_labels=2)
    configs = {
        "bert": BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **common),
        "roberta": RobertaConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                                 pad_token_id=1, **common),
        "mpnet": MPNetConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                             **common),
        "distilbert": DistilBertConfig(dim=16, n_layers=3, n_heads=2, hidden_dim=32, **common),
    }
    torch.manual_seed(0)
    return {name: AutoModelForSequenceClassification.from_config(c) for name, c in configs.items()}


def _pad(features: list[dict]) -> dict[str, torch.Tensor]:
    """input_ids padded with 1 to the longest, and the attention mask (the text tasks' collate, minus labels)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.ones((len(features), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])], mask[i, :len(f["input_ids"])] = torch.tensor(f["input_ids"]), 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "roberta", "mpnet", "distilbert"])
def test_replayed_features_match_the_frozen_blocks(arch, tmp_path):
    """Blocks and head are found for each architecture, and the cache replays the frozen blocks exactly."""
    from tunesmith.config import StrategyConfig
    from tunesmith.strategies import Plan

    model = _tiny_models()[arch].eval()
    layout = find_layout(model)
    assert layout.num_blocks == 3
    assert {n for n, layer in layout.layer_of.items() if layer == "head"} and \
        {n for n, layer in layout.layer_of.items() if layer == "embeddings"}
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(3, 20, size=12)]
    features = [{"input_ids": [2, *rng.integers(5, 60, size=n - 2).tolist(), 3]} for n in lengths]
    blocks = [layout.module(b[0]) for b in layout.blocks]
    for frozen in (1, 3):
        plan = Plan(StrategyConfig(name="linear_probe"), 1e-3, 0.0, layout, frozen_blocks=frozen)
        cache = build_feature_cache(plan, model, features, lengths, _pad, 5,
                                    torch.device("cpu"), "fp32", tmp_path)
        batch_ids = [0, 4, 7, 11]
        batch = _pad([features[i] for i in batch_ids])
        with torch.no_grad():
            direct = model(**batch).logits
            with cache.replay(batch_ids, batch):
                replayed = model(**batch).logits
        assert torch.allclose(direct, replayed, atol=1e-5), (arch, frozen)
        assert [layout.module(b[0]) for b in layout.blocks] == blocks  # the blocks are back after the replay
    if first_token_only(model):  # bert, roberta: a frozen last block computes the first token alone
        plan = Plan(StrategyConfig(name="linear_probe"), 1e-3, 0.0, layout, frozen_blocks=3)
        cache = build_feature_cache(plan, model, features, lengths, _pad, 5,
                                    torch.device("cpu"), "fp32", tmp_path)
        assert cache.store.shape[0] == len(features)  # one row per example, not one per token
        with torch.no_grad(), cache.replay(batch_ids):
            assert torch.allclose(model(**batch).logits, direct, atol=1e-5), arch


def test_large_cache_goes_to_a_memory_mapped_file(tiny_model_dir, data, tmp_path):
    strategy = {"name": "linear_probe", "cache_memory_mb": 0}
    run = tunesmith.train(_config(tiny_model_dir, data, tmp_path, strategy, max_steps=3)).run_dir
    assert json.loads((run / "metrics.json").read_text())["strategy"]["feature_cache"]["memory_mapped"]
    assert not (run / "feature_cache.f32").exists()  # removed when training ends


# ---------------------------------------------------------------- bad inputs: one line, exit code 2

@pytest.mark.parametrize("strategy,expected", [
    ({"name": "finetune"}, "strategy.name: Input should be 'full', 'freeze', 'linear_probe', 'gradual_unfreeze' or 'lora'"),
    ({"name": "freeze", "freeze_layers": 3}, "strategy.freeze_layers: 3 is out of range: the model has 2 transformer blocks"),
    ({"name": "freeze", "freeze_layers": -5}, "strategy.freeze_layers: -5 is out of range"),
    ({"name": "freeze", "freeze_layers": 1.5}, "freeze_layers must be a whole number of blocks or a fraction"),
    ({"name": "freeze", "freeze_embeddings": False}, "strategy 'freeze' freezes nothing"),
    ({"name": "full", "freeze_layers": 2}, "'freeze_layers' applies to strategy freeze, not 'full'"),
    ({"name": "linear_probe", "layerwise_lr_decay": 0.8}, "layerwise_lr_decay works with full, freeze and gradual_unfreeze"),
    ({"name": "full", "layerwise_lr_decay": 1.5}, "strategy.layerwise_lr_decay: Input should be less than or equal to 1"),
    ({"name": "gradual_unfreeze", "unfreeze_every_steps": 2, "unfreeze_every_epochs": 1},
     "set unfreeze_every_epochs or unfreeze_every_steps, not both"),
    ({"name": "lora", "lora": {"target_modules": ["qkv_proj"]}}, "strategy.lora.target_modules: none of qkv_proj is a module of this bert model (its linear layers: "),
    ({"name": "lora", "lora": {"rank": 4}}, "unknown key 'strategy.lora.rank' (known keys: r, alpha, dropout"),
], ids=lambda x: json.dumps(x) if isinstance(x, dict) else None)
def test_bad_strategy_settings(strategy, expected, tiny_model_dir, data, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tiny_model_dir, data, tmp_path, strategy)))
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]
    assert not (tmp_path / "runs").exists()


def test_config_error_names_the_yaml_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  dataset: rotten_tomatoes\nstrategy:\n  name: freeze\n  freeze_layers: 2.5\n")
    with pytest.raises(TunesmithError, match=r"c.yaml, line \d: strategy: freeze_layers must be"):
        load_config(path)
