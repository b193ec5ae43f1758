"""images.py: reading image sources, decoding every colour mode once, transforms, batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tunesmith import images, inputs
from tunesmith.config import CutmixOp, FlipOp, MixupOp, RandAugmentOp, RandomResizedCropOp, RotateOp, TrivialAugmentOp
from tunesmith.errors import TunesmithError

PIXELS = images.PixelConfig((32, 32), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875, "bicubic")  # resize 36


def save(path: Path, array: np.ndarray | None = None, size: tuple[int, int] = (20, 14), seed: int = 0,
         **kwargs) -> Path:
    """An RGB image (random pixels unless given) written by PIL; the format follows the suffix."""
    if array is None:
        array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        for i in range(n):
            save(root / label / f"{i}.png", seed=hash((label, i)) % 1000)
    return root


# ---------------------------------------------------------------- reading sources

def test_folder_reader_sorts_and_ignores_non_images(tmp_path):
    root = image_folder(tmp_path / "train", {"dog": 2, "cat": 1})
    for i in (10, 2):
        save(root / "cat" / f"img{i}.PNG", seed=i)  # upper-case suffix counts; natural order: 2 before 10
    save(root / "cat" / "x.JpEg", seed=3)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    save(root / "loose.png")                        # a file in the root has no class: ignored
    (root / ".ipynb_checkpoints").mkdir()            # a hidden folder is no class
    records = images.read_image_folder(root)
    assert records.labels == ["cat"] * 4 + ["dog"] * 2
    assert [p.name for p in records.paths] == ["0.png", "img2.PNG", "img10.PNG", "x.JpEg", "0.png", "1.png"]
    assert list(records.frame.columns) == ["image", "label"] and len(records) == 6
    sub = records.subset([5, 0])
    assert sub.labels == ["dog", "cat"] and sub.frame["label"].tolist() == ["dog", "cat"]


def test_folder_reader_errors(tmp_path):
    root = image_folder(tmp_path / "data", {"cat": 1})
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(TunesmithError, match=r"dog: class folder 'dog' holds no image files"):
        images.read_image_folder(root)
    splits = image_folder(tmp_path / "splits" / "train", {"cat": 1}).parent
    with pytest.raises(TunesmithError, match=r"train: class folder 'train' holds no image files.*folder of splits"):
        images.read_image_folder(splits)
    with pytest.raises(TunesmithError, match="folder not found"):
        images.read_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "a.png")
    with pytest.raises(TunesmithError, match="no class folders.*1 image"):
        images.read_image_folder(tmp_path / "flat")


def test_table_reader_relative_and_absolute_paths(tmp_path):
    save(tmp_path / "data" / "imgs" / "a.png")
    absolute = save(tmp_path / "elsewhere" / "b.jpg")
    table = tmp_path / "data" / "train.csv"
    table.write_text(f"image,label\nimgs/a.png,cat\n{absolute},dog\n")
    records = images.read_images(table)
    assert records.paths == [tmp_path / "data" / "imgs" / "a.png", absolute]
    assert records.labels == ["cat", "dog"]
    assert records.where[0] == f"{table}, line 2, column 'image': imgs/a.png"


def test_table_reader_missing_file_names_file_line_and_column(tmp_path):
    save(tmp_path / "a.png")
    table = tmp_path / "train.csv"
    table.write_text("image,label\na.png,cat\nmissing.png,dog\n")
    with pytest.raises(TunesmithError) as err:
        images.read_images(table)
    assert str(err.value).startswith(f"{table}, line 3, column 'image': missing.png: file not found")
    table.write_text("image,label\na.png,cat\n,dog\n")
    with pytest.raises(TunesmithError, match=r"line 3, column 'image': expected an image file path, got nothing"):
        images.read_images(table)
    table.write_text("picture,label\na.png,cat\n")
    with pytest.raises(TunesmithError, match="no image path column 'image'"):
        images.read_images(table)


def test_table_reader_multi_label_and_unlabelled(tmp_path):
    save(tmp_path / "a.png")
    save(tmp_path / "b.png")
    csv = tmp_path / "train.csv"
    csv.write_text("image,tags\na.png,cat|indoor\nb.png,\n")
    records = images.read_images(csv, label_column="tags", multi_label=True)
    assert records.labels == [["cat", "indoor"], []]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"image": "a.png", "tags": ["cat", "indoor"]}\n{"image": "b.png", "tags": ["dog"]}\n')
    assert images.read_images(jsonl, label_column="tags", multi_label=True).labels == [["cat", "indoor"], ["dog"]]
    predict = tmp_path / "predict.csv"
    predict.write_text("image,id\na.png,7\n")
    records = images.read_images(predict, require_labels=False)
    assert records.labels is None and records.frame["id"].tolist() == ["7"]
    with pytest.raises(TunesmithError, match="no label column 'label'"):
        images.read_images(predict)


def test_in_memory_table_and_path_lists(tmp_path, monkeypatch):
    save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)  # in-memory tables have no folder: relative paths start here
    token = inputs.register(pd.DataFrame({"image": ["a.png", "gone.png"], "label": ["x", "y"]}), "data.train")
    with pytest.raises(TunesmithError, match=r"data.train \(DataFrame\), index 1, column 'image': gone.png: file not"):
        images.read_images(token)
    records = images.read_images([tmp_path / "a.png"])
    assert records.labels is None and records.frame["image"].tolist() == [str(tmp_path / "a.png")]
    loose = images.read_images(tmp_path, require_labels=False)  # a folder of images, to predict
    assert [p.name for p in loose.paths] == ["a.png"] and loose.labels is None


# ---------------------------------------------------------------- decoding

def test_corrupt_and_non_image_files_fail_when_decoded(tmp_path):
    good = save(tmp_path / "good.png", size=(64, 64))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "notes.txt").write_text("hello")
    table = tmp_path / "t.csv"
    table.write_text("image,label\ngood.png,a\ncut.png,b\n")
    records = images.read_images(table)
    with pytest.raises(TunesmithError, match=r"t.csv, line 3, column 'image': cut.png: not a readable image"):
        images.decode_records(records, PIXELS, 10**9, workers=1)
    for name in ("text.png", "notes.txt"):
        with pytest.raises(TunesmithError, match=rf"{name}: not an image"):
            images.decode_image(tmp_path / name)


def decoded(path: Path) -> np.ndarray:
    out = images.decode_image(path)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    return out


def test_every_colour_mode_becomes_rgb(tmp_path):
    grey = np.array([[0, 128], [200, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "l.png")
    assert (decoded(tmp_path / "l.png") == grey[..., None]).all()

    Image.fromarray(grey, "L").convert("1").save(tmp_path / "one.bmp")
    assert set(np.unique(decoded(tmp_path / "one.bmp"))) <= {0, 255}

    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 255, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = decoded(tmp_path / "rgba.png")[0].astype(int)
    assert out[0].tolist() == [255, 0, 0] and out[1].tolist() == [255, 255, 255]  # transparent -> white
    assert abs(out[2][0] - 127) <= 1 and out[2][2] == 255                        # half-transparent blue on white

    Image.fromarray(np.stack([grey, np.array([[255, 0], [255, 255]], np.uint8)], -1), "LA").save(tmp_path / "la.png")
    assert decoded(tmp_path / "la.png")[0, 1].tolist() == [255, 255, 255]

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 255, 0, 9, 9, 9] + [0] * 762)
    palette.putdata([0, 1])
    palette.save(tmp_path / "p.png", transparency=1)
    assert decoded(tmp_path / "p.png")[0].tolist() == [[0, 255, 0], [255, 255, 255]]
    palette.save(tmp_path / "p.gif")  # a palette without transparency keeps its colours
    assert decoded(tmp_path / "p.gif")[0].tolist() == [[0, 255, 0], [9, 9, 9]]

    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    for name in ("deep.png", "deep.tif"):  # 16-bit scaled, not clipped at 255
        assert decoded(tmp_path / name)[0, :, 0].tolist() == [0, 100, 255]

    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert decoded(tmp_path / "cmyk.tif")[0, 0].tolist() == [255, 0, 0]


def test_exif_rotated_jpeg_is_upright(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)   # stored left half red, right half blue
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6               # orientation 6: the viewer turns it 90 degrees clockwise
    save(tmp_path / "phone.jpg", stored, exif=exif.tobytes(), quality=95)
    out = decoded(tmp_path / "phone.jpg")
    assert out.shape == (40, 20, 3)                     # portrait now
    assert out[2, 10, 0] > 200 and out[2, 10, 2] < 60   # the red half on top
    assert out[37, 10, 2] > 200 and out[37, 10, 0] < 60


def test_decode_resizes_shorter_side_keeping_aspect(tmp_path):
    save(tmp_path / "wide.png", size=(100, 50))
    assert images.decode_image(tmp_path / "wide.png", 36).shape == (36, 72, 3)
    assert images.decode_image(tmp_path / "wide.png", 80, upscale=False).shape == (50, 100, 3)  # never enlarged
    assert images.resized_shape(375, 500, 256) == (256, 341)  # torchvision: int(256 * 500 / 375)


def test_store_decodes_once_across_epochs(tmp_path, monkeypatch):
    records = images.read_image_folder(image_folder(tmp_path / "d", {"a": 3, "b": 2}))
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    store = images.decode_records(records, PIXELS, 10**9, workers=1)
    transform = images.TrainTransform(PIXELS, [FlipOp(op="flip")])
    for epoch in (0, 1):
        batch = torch.stack([transform(store[i], images.example_rng(0, epoch, i)) for i in range(len(store))])
    assert len(opened) == 5
    assert batch.shape == (5, 3, 32, 32)


def test_memory_mapped_store_matches_memory_store(tmp_path):
    records = images.read_image_folder(image_folder(tmp_path / "d", {"a": 3, "b": 3}))
    in_memory = images.decode_records(records, PIXELS, 10**9, workers=1)
    mapped = images.decode_records(records, PIXELS, 100, folder=tmp_path / "cache", name="train", workers=1)
    assert in_memory.path is None and mapped.path.parent == tmp_path / "cache" and mapped.path.name.startswith("train")
    assert isinstance(mapped.buffer, np.memmap) and mapped.nbytes == in_memory.nbytes
    again = pickle.loads(pickle.dumps(mapped.subset([4, 1])))  # how a spawned worker receives it
    for i in range(len(records)):
        assert np.array_equal(in_memory[i], mapped[i])
    assert np.array_equal(again[0], in_memory[4]) and np.array_equal(again[1], in_memory[1])
    path, fold = mapped.path, mapped.subset([0])
    del mapped, again
    assert path.exists() and np.array_equal(fold[0], in_memory[0])  # a subset keeps the file
    del fold
    assert not path.exists()
    temporary = images.decode_records(records, PIXELS, 100, workers=1)  # no folder: the temp folder
    path = temporary.path
    del temporary
    assert not path.exists()
    records.paths[-1].write_bytes(b"broken")  # the last image is bad: no half-written file stays
    with pytest.raises(TunesmithError, match="b/2.png: not an image"):
        images.decode_records(records, PIXELS, 100, folder=tmp_path / "cache", name="train", workers=1)
    assert list((tmp_path / "cache").iterdir()) == []


def test_process_pool_gives_the_same_images_in_order(tmp_path):
    records = images.read_image_folder(image_folder(tmp_path / "d", {"a": 6, "b": 6}))
    serial = list(images.decode_many(records.paths, records.where, 36, workers=1))
    pooled = list(images.decode_many(records.paths, records.where, 36, workers=2))
    assert all(np.array_equal(a, b) for a, b in zip(serial, pooled))
    (records.paths[3]).write_bytes(b"broken")
    with pytest.raises(TunesmithError, match="a/3.png: not an image"):
        list(images.decode_many(records.paths, records.where, 36, workers=2))


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("size,crop_pct,interpolation", [((32, 32), 0.875, "bicubic"), ((24, 24), 1.0, "bilinear"),
                                                         ((24, 32), 0.9, "bicubic")])
def test_eval_transform_equals_timm(tmp_path, size, crop_pct, interpolation):
    from timm.data import create_transform

    info = {"input_size": (3, *size), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "crop_pct": crop_pct,
            "interpolation": interpolation, "crop_mode": "center"}
    timm_eval = create_transform(**info, is_training=False)
    pixels = images.PixelConfig.from_info(info)
    paths = [save(tmp_path / f"{i}.png", size=s, seed=i) for i, s in enumerate([(90, 60), (40, 77), (20, 15)])]
    store = images.decode_records(images.read_images(paths), pixels, 10**9, workers=1)
    ours = images.EvalTransform(pixels)
    for i, path in enumerate(paths):
        expected = timm_eval(Image.open(path).convert("RGB"))
        assert torch.allclose(ours(store[i]), expected, atol=1e-5), path.name


def train_ops():
    return [RandomResizedCropOp(op="random_resized_crop", scale=(0.3, 1.0)), FlipOp(op="flip", p=0.5),
            FlipOp(op="flip", direction="vertical", p=0.5), RotateOp(op="rotate", degrees=30, p=0.5),
            RandAugmentOp(op="randaugment", n=2, magnitude=9), TrivialAugmentOp(op="trivialaugment"),
            MixupOp(op="mixup")]  # mixup is for batches: the per-image transform skips it


def test_train_augmentation_is_seeded_by_seed_epoch_and_index():
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    transform = images.TrainTransform(PIXELS, train_ops())
    out = transform(image, images.example_rng(7, 0, 3))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, transform(image, images.example_rng(7, 0, 3)))
    assert not torch.equal(out, transform(image, images.example_rng(7, 1, 3)))  # next epoch
    assert not torch.equal(out, transform(image, images.example_rng(7, 0, 4)))  # next example
    plain = images.TrainTransform(PIXELS, [])  # no crop op: resize + centre crop, as eval does
    assert torch.equal(plain(image, images.example_rng(0, 0, 0)), images.EvalTransform(PIXELS)(image))
    unfired = images.TrainTransform(PIXELS, [RandomResizedCropOp(op="random_resized_crop", p=0.0)])
    close = unfired(image, images.example_rng(0, 0, 0)) - images.EvalTransform(PIXELS)(image)
    assert close.abs().mean() < 0.05  # the same, resized as a tensor


# ---------------------------------------------------------------- batches

def test_mix_batch_shapes_and_soft_targets():
    x = torch.randn(8, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for op in (MixupOp(op="mixup"), CutmixOp(op="cutmix")):
        mixed, soft = images.mix_batch(x, y, 4, [op], images.batch_rng(0, 0, 5))
        assert mixed.shape == x.shape and soft.shape == (8, 4)
        assert torch.allclose(soft.sum(1), torch.ones(8)) and not torch.equal(mixed, x)
        again, soft_again = images.mix_batch(x, y, 4, [op], images.batch_rng(0, 0, 5))
        assert torch.equal(again, mixed) and torch.equal(soft_again, soft)
    mixed, soft = images.mix_batch(x, y, 4, [MixupOp(op="mixup", p=0.0)], images.batch_rng(0, 0, 0))
    assert mixed is x and torch.equal(soft, torch.nn.functional.one_hot(y, 4).float())
    both = [MixupOp(op="mixup"), CutmixOp(op="cutmix")]
    mixed, soft = images.mix_batch(x, y, 4, both, images.batch_rng(1, 2, 3))
    assert torch.allclose(soft.sum(1), torch.ones(8))


def test_cutmix_target_weight_is_the_pasted_area():
    x = torch.zeros(2, 1, 10, 10)
    x[1] = 1.0  # image 0 is all zeros, so its ones are the pasted area (none when paired with itself)
    pasted = []
    for batch in range(6):
        mixed, soft = images.mix_batch(x, torch.tensor([0, 1]), 2, [CutmixOp(op="cutmix")],
                                       images.batch_rng(0, 0, batch))
        assert soft[0, 1].item() == pytest.approx(mixed[0].mean().item())
        pasted.append(mixed[0].mean().item())
    assert max(pasted) > 0
