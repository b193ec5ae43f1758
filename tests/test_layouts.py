"""Layouts and strategies on image models: tiny random timm and torchvision CNNs and ViTs.

For each architecture: the layout finds the expected blocks and names every parameter; freeze,
linear_probe, gradual_unfreeze, layer-wise LR decay and LoRA train exactly what they should;
frozen BatchNorm keeps its statistics; a merged LoRA model loads into a fresh model of the same
architecture; cached frozen features give the outputs of running the frozen blocks.
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_model
from torch import nn

from tunesmith import features as features_module
from tunesmith.config import StrategyConfig
from tunesmith.errors import TunesmithError
from tunesmith.features import build_feature_cache, run_model
from tunesmith.layouts import find_layout
from tunesmith.strategies import (apply_strategy, load_adapter, optimizer_groups, save_weights, set_train_mode,
                                  unfreeze, unfreeze_due)


def _tiny_timm_vgg() -> nn.Module:
    from timm.models.vgg import VGG  # timm's vgg11 is 129M parameters; the same class, three small stages
    return VGG([8, "M", 16, "M", 32, "M"], num_classes=3, mlp_ratio=1 / 256)


def _tiny_torchvision_vgg() -> nn.Module:
    from torchvision.models.vgg import VGG, make_layers
    model = VGG(make_layers([8, "M", 16, "M", 32, "M"]), num_classes=3)
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 16), nn.ReLU(True), nn.Dropout(), nn.Linear(16, 3))
    return model


# name -> (a fresh random model, blocks expected, embeddings expected)
ARCHS = {
    "timm resnet10t": (lambda: timm.create_model("resnet10t", num_classes=3), 4, True),
    "timm test_efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=3), 5, True),
    "timm mobilenetv2_050": (lambda: timm.create_model("mobilenetv2_050", num_classes=3), 7, True),
    "timm convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=3), 4, True),
    "timm test_vit": (lambda: timm.create_model("test_vit", num_classes=3, img_size=32), 6, True),
    "timm vgg": (_tiny_timm_vgg, 3, False),
    "torchvision resnet18": (lambda: torchvision.models.resnet18(num_classes=3), 4, True),
    "torchvision mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=3, width_mult=0.25), 7, True),
    "torchvision vgg": (_tiny_torchvision_vgg, 3, False),
}
archs = pytest.mark.parametrize("arch", list(ARCHS))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread gains nothing, and on a busy 2-core machine
    OpenMP threads waiting for each other made a forward pass 30-100x slower (0.03 s -> 1-4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(arch: str) -> nn.Module:
    """A fresh copy of the architecture's random model (built once: torchvision's VGG builds its
    102M-parameter classifier before we replace it)."""
    return copy.deepcopy(_built(arch))


@functools.cache
def _built(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHS[arch][0]()


def _cfg(**strategy) -> SimpleNamespace:
    """What apply_strategy and save_weights read of a Config."""
    return SimpleNamespace(strategy=StrategyConfig(**strategy), train=SimpleNamespace(weight_decay=0.01))


def _apply(arch: str, **strategy):
    return apply_strategy(_model(arch), _cfg(**strategy), 10, 1e-2)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trainable_layers(model: nn.Module, layout) -> set[str]:
    return {layout.layer_of[n] for n, p in model.named_parameters() if p.requires_grad}


def _step(model: nn.Module, plan) -> dict[str, torch.Tensor]:
    """One AdamW step on a random batch; returns the weights before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_groups(model, plan), lr=1e-2)
    set_train_mode(model)
    nn.functional.cross_entropy(model(_images()), torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    return before


@archs
def test_layout_names_every_parameter(arch):
    model = _model(arch)
    layout = find_layout(model)
    _, blocks, has_embeddings = ARCHS[arch]
    assert layout.num_blocks == blocks
    assert set(layout.layer_of) == {n for n, _ in model.named_parameters()}
    layers = set(layout.layer_of.values())
    assert layers == {f"layer.{i}" for i in range(blocks)} | {"head"} | ({"embeddings"} if has_embeddings else set())
    assert layout.head_modules(), "a head module holds the classifier"


def test_a_model_without_a_known_layout_is_a_clear_error():
    with pytest.raises(TunesmithError, match="'freeze' needs the model's blocks, and Sequential has no block list"):
        apply_strategy(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)), _cfg(name="freeze", freeze_layers=1), 10, 1e-3)


@archs
def test_freeze_two_blocks_freezes_those_and_the_embeddings(arch):
    model, plan = _apply(arch, name="freeze", freeze_layers=2)
    frozen = {plan.layout.layer_of[n] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"layer.0", "layer.1"} | ({"embeddings"} if ARCHS[arch][2] else set())
    assert plan.frozen_blocks == 2 and plan.bottom_frozen
    _, plan = _apply(arch, name="freeze", freeze_layers=-1)  # all but the top block
    assert plan.frozen_blocks == ARCHS[arch][1] - 1


@archs
def test_linear_probe_changes_only_the_head_and_frozen_batchnorm_keeps_its_statistics(arch):
    model, plan = _apply(arch, name="linear_probe")
    assert _trainable_layers(model, plan.layout) == {"head"}
    buffers = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    before = _step(model, plan)
    changed = {plan.layout.layer_of[n] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"head"}
    head_norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.training]
    assert all(plan.layout.layer_of[f"{n}.weight"] == "head" for n in head_norms)  # only the head's BN trains
    for name, value in buffers.items():
        owner = name.rpartition(".")[0]
        if plan.layout.layer_of.get(f"{owner}.weight") != "head":
            assert torch.equal(value, dict(model.named_buffers())[name]), name


@archs
def test_gradual_unfreezing_opens_the_top_first(arch):
    model, plan = _apply(arch, name="gradual_unfreeze", unfreeze_every_steps=1, freeze_embeddings=False)
    blocks = ARCHS[arch][1]
    assert plan.pending == [f"layer.{i}" for i in reversed(range(blocks))] + ["embeddings"]
    optimizer = torch.optim.AdamW(optimizer_groups(model, plan), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    opened = {"head"}
    for step in (1, 2):
        for layer in unfreeze_due(plan, step):
            unfreeze(plan, model, optimizer, scheduler, layer)
            opened.add(layer)
        assert _trainable_layers(model, plan.layout) == opened
    assert opened == {"head", f"layer.{blocks - 1}", f"layer.{blocks - 2}"}


@archs
def test_layerwise_lr_decays_with_depth(arch):
    model, plan = _apply(arch, name="full", layerwise_lr_decay=0.5)
    lrs = {g["name"].partition("/")[0]: g["lr"] for g in optimizer_groups(model, plan)}
    blocks = ARCHS[arch][1]
    expected = {"head": 1e-2, **{f"layer.{i}": 1e-2 * 0.5 ** (blocks - i) for i in range(blocks)}}
    expected |= {"embeddings": 1e-2 * 0.5 ** (blocks + 1)} if ARCHS[arch][2] else {}
    assert lrs == pytest.approx(expected)


@archs
def test_lora_trains_adapters_and_head_and_the_merged_save_loads_into_a_fresh_model(arch, tmp_path):
    model, plan = _apply(arch, name="lora", lora={"r": 4})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [f"base_model.model.{h}." for h in plan.layout.head_modules()]
    assert any("lora_" in n for n in trainable)
    assert all("lora_" in n or ("modules_to_save" in n and n.startswith(tuple(head))) for n in trainable)
    wrapped = find_layout(model)  # the peft model's layout: adapters sit in their blocks
    adapted_layers = {wrapped.layer_of[n] for n in trainable if "lora_" in n}
    assert adapted_layers == {f"layer.{i}" for i in range(plan.layout.num_blocks)}
    before = _step(model, plan)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed <= set(trainable) and any("lora_B" in n for n in changed)

    save_weights(model, tmp_path / "merged", _cfg(name="lora"))
    save_weights(model, tmp_path / "adapter", _cfg(name="lora", lora={"save": "adapter"}))
    merged = _model(arch)
    load_model(merged, tmp_path / "merged" / "model.safetensors")
    adapted = load_adapter(tmp_path / "adapter", _model(arch))
    x = _images(seed=1)
    with torch.no_grad():
        expected = model.eval()(x)
        assert torch.allclose(merged.eval()(x), expected, atol=1e-5)
        assert torch.allclose(adapted.eval()(x), expected, atol=1e-5)
        assert not torch.allclose(_model(arch).eval()(x), expected, atol=1e-5)  # training changed it


def test_save_weights_writes_a_channels_last_model_and_a_gathered_state_dict_alike(tmp_path):
    """A model without save_pretrained (timm, torchvision) is written as its state_dict, or as the whole weights
    gathered from a sharded model's shards in its place: one path, contiguous tensors either way (a channels_last
    model's conv weights are not), loading into a fresh model of the architecture."""
    model = _model("torchvision resnet18").to(memory_format=torch.channels_last)
    gathered = {name: tensor + 1 for name, tensor in model.state_dict().items()}
    save_weights(model, tmp_path / "own", _cfg())
    save_weights(model, tmp_path / "gathered", _cfg(), gathered)
    for folder, expected in (("own", model.state_dict()), ("gathered", gathered)):
        fresh = _model("torchvision resnet18")
        load_model(fresh, tmp_path / folder / "model.safetensors")
        assert all(torch.equal(tensor, expected[name]) for name, tensor in fresh.state_dict().items()), folder


def test_save_weights_keeps_slices_of_one_storage_and_writes_tied_weights_once(tmp_path):
    """Two weights that are slices of one tensor (a fused projection split in two) are both written, with their
    values; a tied weight (the same tensor under two names) is written once (safetensors' save_model does the same)."""
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.fused = torch.randn(6, 4)
            self.q, self.k = nn.Parameter(self.fused[:3]), nn.Parameter(self.fused[3:])  # one storage
            self.embed = nn.Linear(4, 4)
            self.out = nn.Linear(4, 4)
            self.out.weight = self.embed.weight  # tied

    model = Split()
    assert model.q.untyped_storage().data_ptr() == model.k.untyped_storage().data_ptr()
    save_weights(model, tmp_path / "split", _cfg())
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert set(saved) == {"q", "k", "embed.weight", "embed.bias", "out.bias"}  # the tied weight once
    fresh = Split()
    assert fresh.load_state_dict(saved, strict=False).missing_keys == ["out.weight"]  # as timm loads a file
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in fresh.state_dict().items())


def _collate(features: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([f["pixel_values"] for f in features]),
            "labels": torch.tensor([f["labels"] for f in features])}


@archs
@pytest.mark.parametrize("strategy", [{"name": "linear_probe"}, {"name": "freeze", "freeze_layers": 2}],
                         ids=["linear_probe", "freeze2"])
def test_cached_features_give_the_same_loss(arch, strategy, tmp_path):
    model, plan = _apply(arch, **strategy)
    examples = [{"pixel_values": x, "labels": i % 3} for i, x in enumerate(_images(10))]
    cache = build_feature_cache(plan, model, examples, [1] * 10, _collate, 4, torch.device("cpu"), "fp32", tmp_path)
    assert cache and cache.store.shape[0] == 10
    indices = [7, 2, 5, 0]
    batch = _collate([examples[i] for i in indices])
    losses = []
    for replay in (False, True):
        set_train_mode(model)  # dropout and BatchNorm of the top as in training: same seed, same draws
        torch.manual_seed(1)
        with cache.replay(indices, batch) if replay else nullcontext():
            logits = run_model(model, batch)
        losses.append(nn.functional.cross_entropy(logits, batch["labels"]))
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    assert [type(m) for m in model.modules()] == [type(m) for m in _model(arch).modules()]  # blocks put back


def test_a_cache_too_big_for_memory_goes_to_a_file_and_one_too_big_for_the_disk_is_not_built(tmp_path, monkeypatch):
    model, plan = _apply("timm resnet10t", name="freeze", freeze_layers=1, cache_memory_mb=0)
    examples = [{"pixel_values": x, "labels": 0} for x in _images(6)]
    args = (plan, model, examples, [1] * 6, _collate, 4, torch.device("cpu"), "fp32", tmp_path)
    cache = build_feature_cache(*args)
    assert cache.file is not None and cache.file.exists()
    batch = _collate(examples[:2])
    with torch.no_grad(), cache.replay([0, 1], batch):
        replayed = model.eval()(batch["pixel_values"])
    assert torch.allclose(replayed, model(batch["pixel_values"]), atol=1e-5)
    cache.close()
    assert not cache.file.exists()

    monkeypatch.setattr(features_module.shutil, "disk_usage", lambda folder: SimpleNamespace(free=1000))
    cache = build_feature_cache(*args)
    assert not cache and "half the free disk" in cache.reason and cache.nbytes == 0
    layer1 = model.layer1
    with cache.replay([0, 1], batch):  # changes nothing
        assert model.layer1 is layer1
