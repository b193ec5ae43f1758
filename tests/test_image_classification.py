"""Image classification on tiny random timm / torchvision models and synthetic images: the saved model
loads in plain timm with the same predictions, predict on a folder / files / a table with top-k,
multi-label tables, strategies on a CNN, settings that do not fit, and (integration) the catalog's
pretrained EfficientNet-Lite0 learning real digits."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import tunesmith
from tunesmith.errors import TunesmithError


def _shape(kind: str, size: int, rng: random.Random) -> np.ndarray:
    """A bright square, disc or bar at a random place on a dark noisy background."""
    image = np.full((size, size), rng.randint(0, 40), np.uint8)
    r, cy, cx = size // 4, rng.randint(size // 4, 3 * size // 4), rng.randint(size // 4, 3 * size // 4)
    y, x = np.ogrid[:size, :size]
    if kind == "square":
        mask = (abs(y - cy) <= r) & (abs(x - cx) <= r)
    elif kind == "disc":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    else:
        mask = (abs(y - cy) <= 1) & (x >= 0)
    image[mask] = 220
    return image


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """train/ and test/ folders of class folders (square, disc, bar), 16x16 grey PNGs."""
    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    for split, n in (("train", 90), ("test", 30)):
        for kind in ("bar", "disc", "square"):
            (root / split / kind).mkdir(parents=True)
            for i in range(n // 3):
                Image.fromarray(_shape(kind, 16, rng)).save(root / split / kind / f"{i}.png")
    return root


def _config(root, out, **image):
    return {"task": "image_classification", "model": {"name": "resnet10t"},
            "data": {"train": str(root / "train"), "test": str(root / "test"), "validation_fraction": 0.2},
            "image_classification": {"pretrained": False, "image_size": 32, **image},
            "train": {"epochs": 8, "batch_size": 16, "lr": 3e-3, "seed": 0, "precision": "fp32"},
            "output": {"dir": str(out)}}


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    return tunesmith.train(_config(shapes, tmp_path_factory.mktemp("runs")))


def test_learns_and_the_model_folder_loads_in_plain_timm(trained, shapes):
    import timm
    assert trained.metrics["accuracy"] > 0.8, trained.metrics
    folder = trained.run_dir / "model"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    info = json.loads((folder / "config.json").read_text())
    assert info["label_names"] == ["bar", "disc", "square"] and info["pretrained_cfg"]["input_size"] == [3, 32, 32]
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    files = sorted((shapes / "test" / "disc").glob("*.png"))[:4]
    with torch.no_grad():
        probs = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files])).softmax(-1).numpy()
    ours = tunesmith.predict(trained.run_dir, [str(f) for f in files], precision="fp32")
    assert np.allclose(probs, ours[["prob_bar", "prob_disc", "prob_square"]].to_numpy(), atol=1e-4)


def test_predict_on_a_folder_files_and_a_table_with_top_k(trained, shapes, tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    for i, f in enumerate(sorted((shapes / "test" / "square").glob("*.png"))[:3]):
        (loose / f"img{i}.png").write_bytes(f.read_bytes())
    by_folder = tunesmith.predict(trained.run_dir, str(loose))
    assert len(by_folder) == 3 and {"image", "predicted_label", "top3"} <= set(by_folder.columns)
    top = json.loads(by_folder["top3"][0])
    assert list(top) == sorted(top, key=top.get, reverse=True) and abs(sum(top.values()) - 1) < 1e-4
    table = pd.DataFrame({"image": [f"loose/img{i}.png" for i in range(3)], "id": [7, 8, 9]})
    table.to_csv(tmp_path / "to_predict.csv", index=False)
    out = tmp_path / "preds.csv"
    frame = tunesmith.predict(trained.run_dir, tmp_path / "to_predict.csv", out)
    assert frame["id"].tolist() == ["7", "8", "9"] and out.is_file()  # CSV cells are read as written
    assert frame["predicted_label"].tolist() == by_folder["predicted_label"].tolist()
    metrics = tunesmith.evaluate(trained.run_dir, str(shapes / "test"))
    assert metrics["accuracy"] == pytest.approx(trained.metrics["accuracy"], abs=1e-6)
    assert np.asarray(metrics["confusion_matrix"]).shape == (3, 3)


def test_multi_label_from_a_table(shapes, tmp_path):
    rows = []
    for kind in ("bar", "disc", "square"):
        for f in sorted((shapes / "train" / kind).glob("*.png")):
            rows.append({"image": str(f), "label": kind if kind != "square" else "square|filled"})
    pd.DataFrame(rows).to_csv(tmp_path / "multi.csv", index=False)
    cfg = _config(shapes, tmp_path / "runs")
    cfg["data"] = {"train": str(tmp_path / "multi.csv"), "problem_type": "multi_label", "validation_fraction": 0.2}
    result = tunesmith.train(cfg)
    assert set(result.metrics["per_class"]) == {"bar", "disc", "filled", "square"}
    assert result.metrics["micro_f1"] > 0.6, result.metrics


@pytest.mark.parametrize("strategy", [{"name": "linear_probe"}, {"name": "freeze", "freeze_layers": 2},
                                      {"name": "gradual_unfreeze", "unfreeze_every_epochs": 1},
                                      {"name": "lora", "lora": {"r": 4}}])
def test_strategies_on_a_cnn(shapes, tmp_path, strategy):
    cfg = _config(shapes, tmp_path / "runs")
    cfg["train"]["epochs"] = 3
    cfg["strategy"] = strategy
    result = tunesmith.train(cfg)
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    assert summary["strategy"]["trainable_parameters"] < summary["train"]["total_parameters"] or \
        strategy["name"] == "gradual_unfreeze"
    assert result.metrics["accuracy"] >= 0.0
    assert tunesmith.predict(result.run_dir, str(shapes / "test")).shape[0] == 30


def test_augmentation_and_mixup_train(shapes, tmp_path):
    cfg = _config(shapes, tmp_path / "runs")
    cfg["augment"] = [{"op": "random_resized_crop", "scale": [0.6, 1.0]}, {"op": "flip"}, {"op": "rotate", "p": 0.3},
                      {"op": "mixup", "p": 0.5}]
    cfg["image_classification"]["label_smoothing"] = 0.1
    result = tunesmith.train(cfg)
    assert result.metrics["accuracy"] > 0.6, result.metrics


def test_settings_that_do_not_fit_images(shapes, tmp_path):
    cfg = _config(shapes, tmp_path / "runs")
    with pytest.raises(TunesmithError, match="augment: 'swap' is for text, not task image_classification"):
        tunesmith.train({**cfg, "augment": [{"op": "swap"}]})
    with pytest.raises(TunesmithError, match="predicts classes .* not 'regression'"):
        tunesmith.train({**cfg, "data": {**cfg["data"], "problem_type": "regression"}})
    with pytest.raises(TunesmithError, match="image_classification.pretrained: false"):
        tunesmith.train({**cfg, "image_classification": {"image_size": 32}})  # resnet10t weights: offline
    with pytest.raises(TunesmithError, match="not a catalog image model"):
        tunesmith.train({**cfg, "model": {"name": "no-such-net"}})


def test_torchvision_model_with_a_local_weights_file(shapes, tmp_path):
    import torchvision
    from safetensors.torch import save_file
    torch.manual_seed(0)
    weights = tmp_path / "mobilenet.safetensors"
    save_file(torchvision.models.mobilenet_v2(width_mult=1.0).state_dict(), str(weights))
    cfg = _config(shapes, tmp_path / "runs")
    cfg["model"] = {"name": "torchvision/mobilenet_v2"}
    cfg["image_classification"] = {"weights": str(weights), "image_size": 32}
    cfg["train"]["epochs"] = 1
    result = tunesmith.train(cfg)
    reloaded = tunesmith.predict(result.run_dir, str(shapes / "test"), precision="fp32")
    assert len(reloaded) == 30


@pytest.mark.integration
def test_pretrained_efficientnet_learns_real_digits(tmp_path):
    """The catalog's EfficientNet-Lite0 (ImageNet weights from a package) on scikit-learn's real digits."""
    result = tunesmith.train({"task": "image_classification", "model": {"name": "efficientnet-lite0"},
                              "data": {"dataset": "digits"}, "image_classification": {"image_size": 32},
                              "train": {"max_steps": 120, "seed": 0}, "output": {"dir": str(tmp_path)}})
    assert result.metrics["accuracy"] > 0.8, result.metrics  # 10 classes: chance is 0.1


def test_a_new_head_starts_with_every_class_equally_likely(tmp_path):
    """The fresh classifier is zeroed: timm's own init gives a first loss of 6.3 on 10 digits, and learned slower."""
    from tunesmith.config import load_config
    from tunesmith.tasks.classes import LabelSpace
    from tunesmith.tasks.image_classification import build_model
    cfg = load_config(_config(tmp_path, tmp_path / "runs"))
    model, _ = build_model("resnet10t", LabelSpace("single_label", ["a", "b", "c", "d"]), cfg)
    with torch.no_grad():
        probs = model.eval()(torch.randn(2, 3, 32, 32)).softmax(-1)
    assert torch.allclose(probs, torch.full_like(probs, 0.25))
