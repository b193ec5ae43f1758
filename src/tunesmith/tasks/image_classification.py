"""Image classification: single- or multi-label, on timm or torchvision CNNs and ViTs.

A task module: it provides every name of tasks.base.Task (the generic modules call nothing else).
Data: a folder of class folders, or a table of image paths (images.py reads both). Each image is
decoded once (at most the model's resize size) and kept as uint8; every epoch's training transform
(augment: crop, flip, rotate, RandAugment...) is drawn from a generator seeded by (seed, epoch, image),
so a resumed run sees the same images. Models: a timm folder (catalog efficientnet-lite0 and
mobilenet-v2, or a finished run's model/), any timm architecture name, or `torchvision/<name>`, with
pretrained weights from the folder, image_classification.weights, or the hub when online.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .. import catalog, images
from ..config import Config
from ..errors import TunesmithError
from ..models import hub_reachable as _hub_reachable
from ..schedule import AUTO_MIN_STEPS
from . import classes
from .base import Encoded, Splits, row_outputs, row_targets
from .classes import (LabelSpace, class_ids, compute_metrics, default_metric, degenerate_predictions,  # noqa: F401
                      has_classes, labels_from_dict, metric_names)

NAME = "image_classification"
INPUT_KIND = "image"  # serve: one raw input is an image file's bytes (an upload or base64)
TORCHVISION = "torchvision/"   # model.name prefix of a torchvision architecture
TOP_K = 5                      # predictions list the k likeliest classes
# Peak learning rate per strategy when train.lr is auto (AdamW, batch 32): convolutional and ViT backbones
# fine-tune at about 20x the rate of text encoders (measured: EfficientNet-Lite0 on digits, 60 steps, test
# accuracy 0.66 at 1e-3 against 0.37 at 3e-4; bench/README.md has the table).
AUTO_LR = {"full": 1e-3, "freeze": 1e-3, "gradual_unfreeze": 1e-3, "lora": 2e-3, "linear_probe": 1e-2}
# torchvision's ImageNet preprocessing (its weights' transforms: resize 256, crop 224, bilinear)
TORCHVISION_PIXELS = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                      "crop_pct": 0.875, "interpolation": "bilinear"}


@dataclass
class Examples:
    records: images.ImageRecords
    targets: np.ndarray | None            # class ids or multi-hot rows; None when unlabelled
    groups: list[str] | None = None
    label_names: list[str] = field(default_factory=list)
    store: images.DecodedStore | None = None  # the decoded images, made at the first encode

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, idx: np.ndarray) -> "Examples":
        return Examples(self.records.subset(idx), None if self.targets is None else self.targets[idx],
                        None if self.groups is None else [self.groups[i] for i in idx], self.label_names,
                        None if self.store is None else self.store.subset(idx))


@dataclass
class Processor:
    """Everything that turns decoded images into model inputs, and describes the model to save it."""
    pixels: images.PixelConfig
    library: str                    # timm | torchvision
    architecture: str
    augment: list                   # the config's augment operations
    seed: int
    label_smoothing: float
    memory_limit: int               # bytes of decoded images kept in memory (more: a memory-mapped file)
    num_classes: int = 0
    label_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.eval_transform = images.EvalTransform(self.pixels)
        self.train_transform = images.TrainTransform(self.pixels, self.augment)

    @property
    def soft_targets(self) -> bool:
        return self.label_smoothing > 0 or any(op.op in ("mixup", "cutmix") for op in self.augment)


# ---------------------------------------------------------------- data

def read_examples(source, cfg: Config, labels: LabelSpace | None, require_labels: bool = True) -> Examples:
    """A folder of class folders, a table of image paths (file or in-memory), or a list of image files."""
    data = cfg.data
    records = images.read_images(source, cfg.image_classification.image_column, data.label_column,
                                 data.problem_type == "multi_label", data.label_separator, require_labels)
    groups = None
    if data.group_column and data.group_column in records.frame.columns:
        groups = [str(g) for g in records.frame[data.group_column].tolist()]
    targets, names = None, []
    if records.labels is not None:
        targets, names = _targets(records, data.problem_type, labels)
    return Examples(records, targets, groups, names)


def _targets(records: images.ImageRecords, problem_type: str, labels: LabelSpace | None) -> tuple[np.ndarray, list[str]]:
    from ..data import sort_labels
    rows = records.labels if problem_type == "multi_label" else [[n] for n in records.labels]
    names = labels.names if labels else sort_labels({n for r in rows for n in r})
    index = {n: i for i, n in enumerate(names)}
    for i, row in enumerate(rows):
        for n in row:
            if n not in index:
                raise TunesmithError(f"{records.where[i]}: label '{n}' was not seen in training (known: {', '.join(names)})")
    if problem_type == "single_label":
        return np.asarray([index[r[0]] for r in rows], dtype=np.int64), names
    multi_hot = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, row in enumerate(rows):
        multi_hot[i, [index[n] for n in row]] = 1.0
    return multi_hot, names


def load_splits(cfg: Config) -> Splits:
    if cfg.data.problem_type == "regression":
        raise TunesmithError("data.problem_type: image_classification predicts classes (single_label or multi_label), "
                             "not 'regression'")
    return classes.load_class_splits(cfg, read_examples)


def example_classes(targets, labels: LabelSpace) -> list[np.ndarray]:
    return classes.example_classes(targets, labels)


def stratify_by(examples: Examples, labels: LabelSpace) -> np.ndarray | None:
    return classes.stratify_by(examples.targets, labels)


def map_words(examples: Examples, fn: Callable) -> Examples:
    raise TunesmithError("image examples have no words: image augmentation (augment: crop, flip, rotate...) "
                         "happens as the images are prepared for each epoch")


def show_examples(examples: Examples) -> list[str]:
    return [str(p) for p in examples.records.paths]


# ---------------------------------------------------------------- model

# Convolutions run in channels-last order (weights and images): EfficientNet-Lite0 at 64 px on a 2-core
# AVX512-BF16 CPU, batch 32 (docs/images.md): fp32 training 1.78x, evaluation 2.15x; bf16 training 1.00x,
# evaluation 1.66x. The saved weights are plain contiguous tensors (safetensors makes them so).
CHANNELS_LAST = torch.channels_last


def build_model(source: str, labels: LabelSpace, cfg: Config):
    """A pretrained backbone with a fresh head for `labels`; returns (model, processor)."""
    opts = cfg.image_classification
    model, library, architecture = _create(source, labels.num_outputs, opts.pretrained, opts.weights)
    _zero_new_classifier(model, labels.num_outputs)
    return model.to(memory_format=CHANNELS_LAST), _processor(model, library, architecture, labels, cfg)


def _zero_new_classifier(model, num_classes: int) -> None:
    """Start the new head at zero: every class equally likely, so the first steps tune rather than undo it.

    timm's default head init gives logits of about +-6 on pretrained features (a first loss of 6.3 for 10
    classes); zeroed, EfficientNet-Lite0 on digits reached 0.92 test accuracy in 120 steps against 0.73
    (3 seeds, docs/images.md)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_classes]
    if linears:
        with torch.no_grad():
            linears[-1].weight.zero_()
            if linears[-1].bias is not None:
                linears[-1].bias.zero_()


def _create(source: str, num_classes: int, pretrained: bool, weights: str | None):
    """(model, library, architecture) from a timm folder, a timm name, or torchvision/<name>."""
    import timm
    if source.startswith(TORCHVISION):
        return _torchvision(source[len(TORCHVISION):], num_classes, pretrained, weights)
    folder = Path(source)
    if (folder / "config.json").is_file():
        info = json.loads((folder / "config.json").read_text())
        if info.get("library") == "torchvision":
            return _torchvision(info["architecture"], num_classes, True, str(folder / "model.safetensors"))
        model = _timm(lambda: timm.create_model(f"local-dir:{folder}", pretrained=pretrained, num_classes=num_classes),
                      source)
        return model, "timm", info["architecture"]
    if not timm.is_model(source):
        raise TunesmithError(f"model '{source}': not a catalog image model ({', '.join(_image_catalog())}), a model "
                             f"folder, a timm architecture, or {TORCHVISION}<name>")
    overlay = {"file": str(Path(weights).expanduser())} if weights else None
    if pretrained and not weights and not _hub_reachable():  # say so now, not after a minute of retries
        raise TunesmithError(f"model '{source}': its pretrained weights come from the Hugging Face hub, which cannot "
                             "be reached (offline?); give a local file with image_classification.weights, or set "
                             "image_classification.pretrained: false to start from random weights")
    model = _timm(lambda: timm.create_model(source, pretrained=pretrained, num_classes=num_classes,
                                            pretrained_cfg_overlay=overlay), source)
    return model, "timm", source


def _timm(create: Callable, source: str):
    try:
        return create()
    except (OSError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunesmithError(f"model '{source}': could not load its weights ({first}); offline, give a local file "
                             "with image_classification.weights, or set image_classification.pretrained: false "
                             "to start from random weights") from None


def _torchvision(architecture: str, num_classes: int, pretrained: bool, weights: str | None):
    import torchvision
    try:
        model = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    except ValueError:
        raise TunesmithError(f"model '{TORCHVISION}{architecture}': torchvision has no such model") from None
    if pretrained and weights:
        state = _read_state_dict(Path(weights).expanduser())
        own = model.state_dict()
        kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}  # a new head: sizes differ
        model.load_state_dict(kept, strict=False)
    elif pretrained:
        raise TunesmithError(f"model '{TORCHVISION}{architecture}': give its weights file with "
                             "image_classification.weights (torchvision downloads need the network), or set "
                             "image_classification.pretrained: false")
    return model, "torchvision", architecture


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise TunesmithError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file raises many kinds
        raise TunesmithError(f"{path}: not a readable weights file ({str(exc).splitlines()[0]})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def _image_catalog() -> list[str]:
    from .. import vision_catalog
    return [n for n, e in catalog.MODELS.items() if e.build.__module__ == vision_catalog.__name__]


def _processor(model, library: str, architecture: str, labels: LabelSpace, cfg: Config) -> Processor:
    opts = cfg.image_classification
    if library == "timm":
        import timm
        info = timm.data.resolve_data_config({}, model=model)
    else:
        info = dict(TORCHVISION_PIXELS)
    if opts.image_size != "auto":
        info = {**info, "input_size": (3, opts.image_size, opts.image_size)}
    return Processor(images.PixelConfig.from_info(info), library, architecture, list(cfg.augment), cfg.train.seed,
                     opts.label_smoothing, opts.decoded_cache_mb * 2**20, labels.num_outputs, list(labels.names))


def load_model(folder: str | Path, cfg: Config):
    """A model this task saved: model.safetensors + config.json, which plain timm also loads
    (timm.create_model('local-dir:<folder>', pretrained=True))."""
    info = json.loads((Path(folder) / "config.json").read_text())
    labels = LabelSpace(cfg.data.problem_type, info.get("label_names", []))
    model, library, architecture = _create(str(folder), info["num_classes"], True, None)
    if "input_size" in info.get("pretrained_cfg", {}):  # the pixels it was trained on
        processor = load_processor(folder, cfg)
    else:
        processor = _processor(model, library, architecture, labels, cfg)
    return model.to(memory_format=CHANNELS_LAST), processor


def load_processor(folder: str | Path, cfg: Config) -> Processor:
    """The evaluation-time processor saved in config.json (pixels, labels), without the weights (export, ONNX)."""
    path = Path(folder) / "config.json"
    info = json.loads(path.read_text())
    pre = info.get("pretrained_cfg", {})
    if "input_size" not in pre:
        raise TunesmithError(f"{path}: no pixel settings (pretrained_cfg.input_size); export the run's model/ folder")
    return Processor(images.PixelConfig.from_info(pre), info.get("library", "timm"), info["architecture"], [],
                     cfg.train.seed, 0.0, cfg.image_classification.decoded_cache_mb * 2**20, info["num_classes"],
                     info.get("label_names", []))


def save_processor(processor: Processor, folder: Path) -> None:
    """config.json in timm's hub layout (architecture, num_classes, pretrained_cfg with the pixels)."""
    px = processor.pixels
    pretrained_cfg = {"input_size": [3, *px.input_size], "mean": list(px.mean), "std": list(px.std),
                      "crop_pct": px.crop_pct, "interpolation": px.interpolation, "num_classes": processor.num_classes}
    info = {"architecture": processor.architecture, "num_classes": processor.num_classes,
            "label_names": processor.label_names, "pretrained_cfg": pretrained_cfg}
    if processor.library != "timm":
        info["library"] = processor.library
    (folder / "config.json").write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------- features, loss, outputs

def encode(processor: Processor, examples: Examples, cfg: Config, train: bool = False, epoch: int = 0) -> Encoded:
    """One feature per image, pointing at its decoded pixels; the images are decoded once, here, the first time."""
    if examples.store is None:
        examples.store = images.decode_records(examples.records, processor.pixels, processor.memory_limit,
                                               catalog.cache_dir() / "decoded")
    features = []
    for i in range(len(examples)):
        feat = {"store": examples.store, "index": i, "train": train, "epoch": epoch}
        if examples.targets is not None:
            feat["labels"] = examples.targets[i]
        features.append(feat)
    return Encoded(features, [1] * len(features), num_examples=len(features))


def describe_inputs(enc: Encoded, cfg: Config) -> str:
    store = enc.features[0]["store"] if enc.features else None
    size = f"{store.nbytes / 2**20:.0f} MiB decoded" if store is not None else "none"
    return f"{len(enc.features)} images ({size}, {'memory-mapped' if store is not None and store.path else 'in memory'})"


def make_collate(processor: Processor, multiple: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Transform each image (training: this epoch's augmentation; else the eval crop) and stack them; a
    training batch gets mixup / cutmix and label smoothing as soft targets ('soft_labels')."""
    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        first = features[0]
        pixels = torch.stack([
            processor.train_transform(f["store"][f["index"]], images.example_rng(processor.seed, f["epoch"], f["index"]))
            if f["train"] else processor.eval_transform(f["store"][f["index"]]) for f in features])
        batch = {"pixel_values": pixels}
        if "labels" in first:
            labels = torch.as_tensor(np.stack([f["labels"] for f in features]))
            if first["train"] and processor.soft_targets and labels.dim() == 1:
                rng = images.batch_rng(processor.seed, first["epoch"], first["index"])
                batch["pixel_values"], soft = images.mix_batch(pixels, labels, processor.num_classes, processor.augment,
                                                               rng)
                s = processor.label_smoothing
                batch["soft_labels"] = soft * (1 - s) + s / processor.num_classes
            else:
                batch["labels"] = labels
        batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=CHANNELS_LAST)
        return batch
    return collate


def forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, loss): cross-entropy for class ids, against soft targets after mixup / smoothing, binary
    cross-entropy per class for multi-label rows; no loss without labels."""
    logits = model(batch["pixel_values"])
    if "soft_labels" in batch:
        return logits, F.cross_entropy(logits.float(), batch["soft_labels"])
    labels = batch.get("labels")
    if labels is None:
        return logits, None
    if labels.dtype.is_floating_point:
        return logits, F.binary_cross_entropy_with_logits(logits.float(), labels)
    return logits, F.cross_entropy(logits.float(), labels)


def auto_lr(strategy: str, batch_size: int) -> float:
    return AUTO_LR[strategy]


def auto_min_steps() -> int:
    return AUTO_MIN_STEPS


def cpu_bf16_needs_amx() -> bool:
    """Train in bf16 on a CPU only with AMX: on an AVX512-BF16 CPU without it, EfficientNet-Lite0 (64 px,
    batch 32, channels-last) trained at 165 images/s in fp32 against 94 under bf16 (bench/vs_timm.py)."""
    return True


def extra_loss_weights(cfg: Config, labels: LabelSpace) -> np.ndarray | None:
    return None


def split_outputs(logits: np.ndarray, features: list[dict]) -> list:
    return row_outputs(logits, features)


def merge_windows(outputs: list, enc: Encoded, aggregation: str = "mean") -> np.ndarray:
    return classes.merge_rows(outputs, None, enc.num_examples, aggregation)


def window_targets(outputs, enc: Encoded) -> list[np.ndarray]:
    return row_targets(outputs, enc)


def predictions_frame(examples: Examples, logits: np.ndarray, labels: LabelSpace) -> pd.DataFrame:
    """The source rows (image path, label when known), the prediction, per-class probabilities and the top k."""
    frame = classes.prediction_columns(examples.records.frame, logits, labels)
    if labels.problem_type == "single_label" and len(labels.names) > 2:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        k = min(TOP_K, len(labels.names))
        top = np.argsort(-probs, axis=1)[:, :k]
        frame[f"top{k}"] = [json.dumps({labels.names[j]: round(float(p[j]), 6) for j in row})
                            for row, p in zip(top, probs)]
    return frame

