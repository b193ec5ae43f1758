"""Images for image classification: read the sources, decode every image once, transform, mix.

    records = read_images(cfg.data.train, image_column=..., label_column=...)  # paths, labels, where-info
    pixels = PixelConfig.from_info(image_model_info(folder))  # or timm.data.resolve_data_config(model=...)
    store = decode_records(records, pixels, memory_limit_bytes, cache_folder)  # uint8 arrays, decoded once
    x = TrainTransform(pixels, cfg.augment)(store[i], example_rng(seed, epoch, i))  # or EvalTransform(pixels)
    x, soft_targets = mix_batch(x_batch, labels, n_classes, cfg.augment, batch_rng(seed, epoch, i))

The task module (tasks/image_classification.py) puts these together in its encode and collate.

A decoded image is uint8 HxWx3, upright (EXIF), RGB, its shorter side shrunk to the model's resize size
(input / crop_pct, as timm's eval transform resizes); smaller images stay small (a 28x28 digit takes 2.3 KB,
not 196 KB at 256x256) and the transforms enlarge them. Training draws come from generators seeded by
(seed, epoch, example), so an epoch is the same after a resume.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from . import inputs
from .data import label_names, multi_label_names, read_table
from .errors import TunesmithError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PIL_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}
# Decoding pool: threads, as Pillow decodes and resizes without the GIL (2,000 500x375 JPEGs -> 256 on 2 busy
# cores: serial 6.5 CPU-s; a thread pool adds nothing to that, a process pool 2 CPU-s, 1.2 of them in the
# main process unpickling the images). Tiny images (28x28 PNG, 0.1 ms each) gain nothing either way.
POOL_MIN_IMAGES = 256
PROGRESS_MIN_IMAGES = 500


# ---------------------------------------------------------------- reading sources

@dataclass
class ImageRecords:
    """Images of one split: file paths, labels (None when unlabelled), how errors name each record, and
    the source rows (the table's, or image + label for a folder) for prediction output."""
    paths: list[Path]
    labels: list[str] | list[list[str]] | None
    where: list[str]
    frame: pd.DataFrame
    source: str

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "ImageRecords":
        idx = [int(i) for i in idx]
        labels = None if self.labels is None else [self.labels[i] for i in idx]
        return ImageRecords([self.paths[i] for i in idx], labels, [self.where[i] for i in idx],
                            self.frame.iloc[idx].reset_index(drop=True), self.source)


def read_images(source: Any, image_column: str = "image", label_column: str = "label", multi_label: bool = False,
                separator: str = "|", require_labels: bool = True) -> ImageRecords:
    """Any image source: a folder of class folders, a table (file or in-memory token) of image paths, a
    list of image paths, or (unlabelled) a folder of images or one image file."""
    if isinstance(source, (list, tuple)):
        return read_image_paths(source, image_column)
    if inputs.is_token(source) or Path(source).suffix.lower() in (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq"):
        return read_image_table(source, image_column, label_column, multi_label, separator, require_labels)
    path = Path(source)
    if path.is_dir() and not require_labels and any(_is_image_file(p) for p in path.iterdir()) \
            and not any(_is_class_dir(p) for p in path.iterdir()):
        return read_image_paths(sorted((p for p in path.iterdir() if _is_image_file(p)), key=_natural),
                                image_column, str(path))
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not require_labels:
        return read_image_paths([path], image_column)
    return read_image_folder(path, image_column, label_column)


def read_image_folder(folder: str | Path, image_column: str = "image", label_column: str = "label") -> ImageRecords:
    """ImageFolder layout: one subfolder per class, named after it, holding that class's images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TunesmithError(f"{folder}: {'not a folder' if folder.exists() else 'folder not found'} "
                             "(expected a folder with one subfolder of images per class)")
    classes = sorted((d for d in folder.iterdir() if _is_class_dir(d)), key=_natural)
    if not classes:
        loose = sum(_is_image_file(p) for p in folder.iterdir())
        found = f"; it holds {loose} image(s) directly, which need a label" if loose else ""
        raise TunesmithError(f"{folder}: no class folders (expected one subfolder of images per class){found}")
    paths, labels = [], []
    for d in classes:
        files = sorted((p for p in d.iterdir() if _is_image_file(p)), key=_natural)
        if not files:
            inner = [s.name for s in sorted(d.iterdir(), key=_natural) if _is_class_dir(s)][:3]
            hint = (f"; it holds folders ({', '.join(inner)}): is {folder} a folder of splits? then give {d}"
                    if inner else "")
            raise TunesmithError(f"{d}: class folder '{d.name}' holds no image files "
                                 f"({' '.join(IMAGE_SUFFIXES)}){hint}")
        paths += files
        labels += [d.name] * len(files)
    frame = pd.DataFrame({image_column: [str(p) for p in paths], label_column: labels})
    return ImageRecords(paths, labels, [str(p) for p in paths], frame, str(folder))


def read_image_table(source: str | Path, image_column: str = "image", label_column: str = "label",
                     multi_label: bool = False, separator: str = "|", require_labels: bool = True) -> ImageRecords:
    """A table with a column of image paths (relative to the table's folder, or absolute) and labels."""
    table = read_table(source)
    # in-memory data has no folder of its own: its relative paths start from the working directory
    base = Path.cwd() if inputs.is_token(source) else Path(table.path).parent
    paths, where = [], []
    for i, value in enumerate(table.column(image_column, "image path").tolist()):
        at = table.where(i, image_column)
        if not isinstance(value, str) or not value.strip():
            empty = value is None or isinstance(value, str) or (isinstance(value, float) and math.isnan(value))
            raise TunesmithError(f"{at}: expected an image file path, got "
                                 f"{'nothing' if empty else 'a ' + type(value).__name__}")
        path = Path(value.strip()).expanduser()
        paths.append(path if path.is_absolute() else base / path)
        where.append(f"{at}: {value.strip()}")
        _check_file(paths[-1], where[-1])
    labels = None
    if require_labels or label_column in table.df.columns:
        labels = multi_label_names(table, label_column, separator) if multi_label else label_names(table, label_column)
    return ImageRecords(paths, labels, where, table.df, str(table.path))


def read_image_paths(paths: Sequence[str | Path], image_column: str = "image", source: str = "images") -> ImageRecords:
    """Unlabelled image files (to predict)."""
    if not paths:
        raise TunesmithError(f"{source}: no image files given")
    paths = [Path(p) for p in paths]
    for p in paths:
        _check_file(p, str(p))
    return ImageRecords(paths, None, [str(p) for p in paths], pd.DataFrame({image_column: [str(p) for p in paths]}),
                        source)


def _check_file(path: Path, where: str) -> None:
    if path.is_dir():
        raise TunesmithError(f"{where}: is a folder, not an image file")
    if not path.is_file():
        raise TunesmithError(f"{where}: file not found (looked for {path.resolve()})")


def _is_class_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and path.name != "__MACOSX"


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _natural(path: Path) -> list:
    """'img2' before 'img10'; the same order on every machine."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


# ---------------------------------------------------------------- decoding

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16-bit and float scaled to 0-255."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        # 16-bit (and 32-bit "I", which 16-bit PNGs and TIFFs open as): 65535 / 257 = 255 exactly;
        # float images are taken as 0..1 when they fit, else as 0..255
        scale = 1 / 257 if img.mode != "F" else (255.0 if values.max(initial=0) <= 1.0 else 1.0)
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")  # palette or colour-key transparency becomes an alpha channel
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # on white, not black: transparent parts of icons and scans are background, usually light
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def resized_shape(height: int, width: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """(h, w) after timm's eval resize: an int sets the shorter side (torchvision's rounding: the longer
    side is int(size * long / short)); (h, w) scales until both sides reach it (timm's ResizeKeepRatio)."""
    if isinstance(resize, int):
        short, long = sorted((height, width))
        new_long = int(resize * long / short)
        return (new_long, resize) if height > width else (resize, new_long)
    ratio = min(height / resize[0], width / resize[1])
    return round(height / ratio), round(width / ratio)


def _needs_resize(height: int, width: int, resize: int | tuple[int, int], upscale: bool) -> tuple[int, int] | None:
    shape = resized_shape(height, width, resize)
    if shape == (height, width) or (not upscale and shape[0] * shape[1] > height * width):
        return None
    return shape


def decode_image(path: str | Path, resize: int | tuple[int, int] | None = None, interpolation: str = "bicubic",
                 where: str | None = None, upscale: bool = True) -> np.ndarray:
    """One image file as uint8 HxWx3: upright per its EXIF orientation, RGB, resized to `resize` (keeping its
    aspect ratio; with upscale=False only shrunk). A missing, corrupt or non-image file is a TunesmithError."""
    where = where or str(path)
    try:
        with Image.open(path) as img:
            img.load()  # decodes now: a truncated or corrupt file fails here, not at first use
            ImageOps.exif_transpose(img, in_place=True)
            img = to_rgb(img)
            shape = _needs_resize(img.height, img.width, resize, upscale) if resize else None
            if shape:
                img = img.resize((shape[1], shape[0]), resample=_resample(interpolation))
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise TunesmithError(f"{where}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise TunesmithError(f"{where}: image too large to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise TunesmithError(f"{where}: not an image (or in a format Pillow cannot read)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        # PIL raises these for unknown formats, truncated data and unsupported modes
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TunesmithError(f"{where}: not a readable image ({reason})") from None


def _resample(interpolation: str) -> int:
    if interpolation not in PIL_RESAMPLE:
        raise TunesmithError(f"interpolation '{interpolation}': use one of {', '.join(PIL_RESAMPLE)}")
    return PIL_RESAMPLE[interpolation]


def decode_many(paths: Sequence[Path], where: Sequence[str], resize: int | tuple[int, int] | None,
                interpolation: str = "bicubic", upscale: bool = False, workers: int | None = None,
                desc: str = "decoding images") -> Iterator[np.ndarray]:
    """Decoded images in the order of `paths`, from a thread pool when there are many (workers=None: one per
    core from POOL_MIN_IMAGES images on), with a progress bar on stderr for long runs."""
    n = len(paths)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= POOL_MIN_IMAGES else 1

    def decode_chunk(start: int) -> list[np.ndarray]:
        return [decode_image(paths[i], resize, interpolation, where[i], upscale)
                for i in range(start, min(start + 32, n))]

    bar = tqdm(total=n, desc=desc, unit="image", file=sys.stderr, dynamic_ncols=True,
               disable=None if n >= PROGRESS_MIN_IMAGES else True)
    pool = ThreadPoolExecutor(workers)  # workers=1: one thread decodes while the caller stores
    pending: deque = deque()  # chunks in flight, at most 2 per worker: decoded images wait in memory there
    try:
        for start in range(0, n, 32):
            pending.append(pool.submit(decode_chunk, start))
            while pending and (len(pending) > 2 * workers or start + 32 >= n):
                chunk = pending.popleft().result()
                bar.update(len(chunk))
                yield from chunk
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, skip the chunks not yet started


class DecodedStore:
    """Every decoded image of a split, kept once: one flat uint8 buffer (in memory, or a memory-mapped
    file when larger than the memory limit) + the start offset and shape of each image."""

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, path: Path | None = None):
        self.buffer, self.offsets, self.shapes, self.path = buffer, offsets, shapes, path

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, i: int) -> np.ndarray:
        """Image i as a fresh HxWx3 array (a copy: transforms may write into it; the store stays read-only)."""
        h, w, c = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        return np.array(self.buffer[start:start + h * w * c]).reshape(h, w, c)

    @property
    def nbytes(self) -> int:
        return int((self.shapes.prod(axis=1)).sum())

    def subset(self, idx: Sequence[int] | np.ndarray) -> "DecodedStore":
        """Some images (a fold, a held-out part), sharing this store's buffer: no copy, no decode."""
        idx = np.asarray(idx, dtype=np.int64)
        return DecodedStore(self.buffer, self.offsets[idx], self.shapes[idx], self.path)

    def __getstate__(self) -> dict:
        # a memory-mapped store travels to spawned workers as its path, not as its bytes
        state = dict(self.__dict__)
        if self.path is not None:
            state["buffer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.buffer is None:
            self.buffer = np.memmap(self.path, dtype=np.uint8, mode="r")


def decode_store(images: Iterator[np.ndarray], count: int, memory_limit_bytes: int, folder: str | Path | None = None,
                 name: str = "images") -> DecodedStore:
    """Collect decoded images into a DecodedStore: in memory up to memory_limit_bytes, else in a file
    <folder>/<name>-*.decoded (default: the temp folder), deleted when the store and its subsets are."""
    shapes = np.zeros((count, 3), dtype=np.int64)
    offsets = np.zeros(count, dtype=np.int64)
    kept: list[np.ndarray] = []
    file, path, total = None, None, 0
    try:
        for i, image in enumerate(images):
            shapes[i], offsets[i] = image.shape, total
            total += image.size
            if file is None and total > memory_limit_bytes:  # too big: from here on, everything goes to disk
                path = _store_path(folder, name)
                file = open(path, "wb")
                for earlier in kept:
                    file.write(earlier.data)
                kept = []
            if file is not None:
                file.write(image.data)  # no copy: the array is contiguous
            else:
                kept.append(image.reshape(-1))
    except BaseException:  # a bad image late in a big split leaves no half-written file behind
        if file is not None:
            file.close()
            path.unlink(missing_ok=True)
        raise
    if file is None:
        # one flat buffer (the peak is twice the images, both under the limit): workers forked later
        # share its pages instead of touching a million small arrays' reference counts
        return DecodedStore(np.concatenate(kept) if kept else np.zeros(0, np.uint8), offsets, shapes)
    file.close()
    store = DecodedStore(np.memmap(path, dtype=np.uint8, mode="r"), offsets, shapes, path)
    weakref.finalize(store.buffer, path.unlink, missing_ok=True)  # subsets share the buffer: the last one
    return store


def decode_records(records: ImageRecords, pixels: PixelConfig, memory_limit_bytes: int,
                   folder: str | Path | None = None, name: str = "images", workers: int | None = None) -> DecodedStore:
    """Decode a split once, at the model's resize size (images already smaller stay as they are)."""
    images = decode_many(records.paths, records.where, pixels.resize_size, pixels.interpolation, upscale=False,
                         workers=workers, desc=f"decoding {name}")
    return decode_store(images, len(records), memory_limit_bytes, folder, name)


def _store_path(folder: str | Path | None, name: str) -> Path:
    # a new file each time: rewriting one that a live store still maps would crash it (SIGBUS)
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".decoded", dir=folder)
    os.close(handle)
    return Path(path)


# ---------------------------------------------------------------- transforms

@dataclass(frozen=True)
class PixelConfig:
    """How the model wants its pixels (timm's data config): input (h, w), normalisation, resize and crop."""
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "PixelConfig":
        """From image_model_info(folder) or timm.data.resolve_data_config (input_size is (3, h, w))."""
        size = tuple(info["input_size"])[-2:]
        interpolation = info.get("interpolation", "bicubic")
        return cls((int(size[0]), int(size[1])), tuple(info["mean"]), tuple(info["std"]),
                   float(info.get("crop_pct") or 0.875), "bicubic" if interpolation == "random" else interpolation)

    @property
    def resize_size(self) -> int | tuple[int, int]:
        """timm's eval resize: floor(224 / 0.875) = 256; an int (the shorter side) for square inputs."""
        h, w = (math.floor(s / self.crop_pct) for s in self.input_size)
        return h if self.input_size[0] == self.input_size[1] else (h, w)

    @property
    def fill(self) -> list[int]:
        """The mean colour: corners that rotations uncover become 0 after normalising."""
        return [round(255 * m) for m in self.mean]

    @property
    def tensor_interpolation(self) -> F.InterpolationMode:  # tensors: nearest, bilinear or bicubic
        return F.InterpolationMode(self.interpolation if self.interpolation in ("nearest", "bilinear") else "bicubic")


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one training example's transform in one epoch."""
    return np.random.default_rng([seed % 2**32, epoch, index])


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of one batch's mixup / cutmix (the trailing 1 keeps it apart from example_rng)."""
    return np.random.default_rng([seed % 2**32, epoch, batch, 1])


def _normalize(t: torch.Tensor, pixels: PixelConfig) -> torch.Tensor:
    return F.normalize(F.to_dtype(t, torch.float32, scale=True), list(pixels.mean), list(pixels.std))


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def _eval_crop(image: np.ndarray, pixels: PixelConfig) -> torch.Tensor:
    """Resize (with PIL, as timm does: the same pixels; a no-op for images decoded at that size), centre crop."""
    shape = _needs_resize(image.shape[0], image.shape[1], pixels.resize_size, upscale=True)
    if shape:
        image = np.array(Image.fromarray(image).resize((shape[1], shape[0]), _resample(pixels.interpolation)))
    return F.center_crop(_chw(image), list(pixels.input_size))


class EvalTransform:
    """timm's eval transform on a decoded image: resize, centre crop, normalise."""

    def __init__(self, pixels: PixelConfig):
        self.pixels = pixels

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        return _normalize(_eval_crop(image, self.pixels), self.pixels)


class TrainTransform:
    """The configured augment ops, in order, on a decoded image; mixup and cutmix work on batches (mix_batch).

    The image reaches the input size where random_resized_crop stands in the list (resize + centre crop
    when it does not fire), or first when it is absent. Each op fires with its p drawn from `rng`; the
    torchvision transforms draw from torch's generator, seeded from `rng` for that call only."""

    def __init__(self, pixels: PixelConfig, ops: Sequence[Any] = ()):
        self.pixels = pixels
        self.ops = [op for op in ops if op.op not in ("mixup", "cutmix")]
        self.transforms = [self._torchvision(op) for op in self.ops]

    def _torchvision(self, op: Any) -> Any:
        fill, bilinear = self.pixels.fill, F.InterpolationMode.BILINEAR  # policies rotate with nearest or bilinear
        if op.op == "random_resized_crop":
            return T.RandomResizedCrop(self.pixels.input_size, op.scale, op.ratio,
                                       self.pixels.tensor_interpolation, antialias=True)
        if op.op == "flip":
            return F.horizontal_flip if op.direction == "horizontal" else F.vertical_flip
        if op.op == "rotate":
            return T.RandomRotation(op.degrees, bilinear, fill=fill)
        if op.op == "randaugment":
            return T.RandAugment(op.n, op.magnitude, interpolation=bilinear, fill=fill)
        return T.TrivialAugmentWide(interpolation=bilinear, fill=fill)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        has_crop = any(op.op == "random_resized_crop" for op in self.ops)
        t = _chw(image) if has_crop else _eval_crop(image, self.pixels)
        for op, transform in zip(self.ops, self.transforms):
            if rng.random() >= op.p:
                t = self._centre(t) if op.op == "random_resized_crop" else t
            elif op.op == "flip":
                t = transform(t)
            else:
                with torch.random.fork_rng(devices=[]):  # the worker's own generator stays untouched
                    torch.manual_seed(int(rng.integers(2**63)))
                    t = transform(t)
        return _normalize(t, self.pixels)

    def _centre(self, t: torch.Tensor) -> torch.Tensor:
        shape = _needs_resize(t.shape[1], t.shape[2], self.pixels.resize_size, upscale=True)
        if shape:
            t = F.resize(t, list(shape), interpolation=self.pixels.tensor_interpolation, antialias=True)
        return F.center_crop(t, list(self.pixels.input_size))


# ---------------------------------------------------------------- batches

def mix_batch(pixel_values: torch.Tensor, targets: torch.Tensor, num_classes: int, ops: Sequence[Any],
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix on a batch -> (pixels, soft targets summing to 1 per row; multi-hot rows stay multi-hot
    mixtures). Each op fires with its p; when both fire, one is chosen at random (as timm's switch does).
    targets: class ids (B,) or float rows (B, num_classes). Without a firing op, targets come back as floats."""
    soft = nnf.one_hot(targets.long(), num_classes).float() if targets.dim() == 1 else targets.float()
    fired = [op for op in ops if op.op in ("mixup", "cutmix") and rng.random() < op.p]
    if not fired or len(pixel_values) < 2:
        return pixel_values, soft
    op = fired[int(rng.integers(len(fired)))]
    perm = torch.from_numpy(rng.permutation(len(pixel_values)))
    lam = float(rng.beta(op.alpha, op.alpha))
    if op.op == "mixup":
        mixed = lam * pixel_values + (1 - lam) * pixel_values[perm]
    else:
        mixed, lam = _cutmix(pixel_values, perm, lam, rng)
    return mixed, lam * soft + (1 - lam) * soft[perm]


def _cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Paste a box covering about 1 - lam of the area from the permuted batch; lam becomes the share kept."""
    height, width = x.shape[-2:]
    cut = math.sqrt(1 - lam)  # box sides scale with the square root of its area share
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    mixed = x.clone()
    mixed[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return mixed, 1 - (y1 - y0) * (x1 - x0) / (height * width)
