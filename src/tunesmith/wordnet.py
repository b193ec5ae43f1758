"""WordNet 3.0 synonyms, read straight from the database files of Debian's `wordnet-base` package.

Files (format: `man 5 wndb`): `index.<pos>` lines are `lemma pos synset_cnt p_cnt [ptr...] sense_cnt
tagsense_cnt offset...`, the last synset_cnt fields being byte offsets into `data.<pos>`, whose line at
that offset is `offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] ...`. License
lines start with two spaces. Found in /usr/share/wordnet, else in the cache after `tunesmith fetch wordnet`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .catalog import _sha256, build_folder, cache_dir
from .errors import TunesmithError

POS = ("noun", "verb", "adj", "adv")
SYSTEM_DIR = Path("/usr/share/wordnet")
# Debian's wordnet-base 1:3.0-37 (bookworm/trixie): the .deb we accept from `apt-get download`.
DEB_VERSION = "1:3.0-37"
DEB_SHA256 = "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752"
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: 'outback(a)', 'ready_to_hand(p)'


class WordNet:
    """Synonyms of a word: the other lemmas of every synset (any part of speech) the word belongs to."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index: dict[str, list[tuple[str, int]]] = {}
        self.data: dict[str, bytes] = {}
        for pos in POS:
            index_file, data_file = self.folder / f"index.{pos}", self.folder / f"data.{pos}"
            if not index_file.is_file() or not data_file.is_file():
                raise TunesmithError(f"{self.folder}: not a WordNet database (no index.{pos} / data.{pos})")
            self.data[pos] = data_file.read_bytes()  # ~30 MB for all four; lines are read at byte offsets
            for n, line in enumerate(index_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line or line.startswith("  "):
                    continue
                fields = line.split()
                try:
                    count = int(fields[2])
                    offsets = [int(x) for x in fields[len(fields) - count:]] if count else []
                except (IndexError, ValueError):
                    raise TunesmithError(f"{index_file}, line {n}: not a WordNet index line") from None
                self.index.setdefault(fields[0], []).extend((pos, off) for off in offsets)

    def _synset_words(self, pos: str, offset: int) -> list[str]:
        data = self.data[pos]
        end = data.find(b"\n", offset)
        fields = data[offset:end if end >= 0 else len(data)].decode("utf-8", "replace").split()
        if not fields or fields[0] != f"{offset:08d}":
            raise TunesmithError(f"{self.folder / f'data.{pos}'}, byte {offset}: no synset there (index and data "
                                 "files do not match)")
        count = int(fields[3], 16)
        return [_MARKER.sub("", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]

    @lru_cache(maxsize=65536)
    def synonyms(self, word: str) -> tuple[str, ...]:
        """Other lemmas sharing a synset with `word` (case-insensitive), in database order, no repeats."""
        key = word.lower().replace(" ", "_")
        out: dict[str, None] = {}
        for pos, offset in self.index.get(key, ()):
            for lemma in self._synset_words(pos, offset):
                if lemma.lower() != word.lower():
                    out.setdefault(lemma)
        return tuple(out)


def cached_dir() -> Path:
    return cache_dir() / "wordnet"


def find_wordnet() -> Path:
    """The folder holding the WordNet files: the system's, else the one `tunesmith fetch wordnet` made."""
    for folder in (SYSTEM_DIR, cached_dir() / "usr" / "share" / "wordnet"):
        if (folder / "data.noun").is_file():
            return folder
    raise TunesmithError(f"WordNet not found (looked in {SYSTEM_DIR} and {cached_dir()}); synonym operations need "
                         "it: run `apt-get install wordnet-base` or `tunesmith fetch wordnet`")


@lru_cache(maxsize=2)
def load(folder: str | None = None) -> WordNet:
    return WordNet(folder or find_wordnet())


def fetch_wordnet() -> Path:
    """Download Debian's wordnet-base with apt-get (no root needed), check its SHA-256, unpack it with
    dpkg-deb into a temporary folder and rename that into the cache. Returns the database folder."""
    try:
        return find_wordnet()
    except TunesmithError:
        pass
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise TunesmithError("cannot fetch WordNet: apt-get and dpkg-deb are needed (a Debian or Ubuntu system); "
                             "install the package wordnet-base some other way")
    target = cached_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"tunesmith: fetching wordnet-base={DEB_VERSION} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run(["apt-get", "download", f"wordnet-base={DEB_VERSION}"], cwd=tmp,
                              capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or len(debs) != 1:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise TunesmithError(f"could not download wordnet-base={DEB_VERSION} with apt-get: {last}")
        actual = _sha256(debs[0])
        if actual != DEB_SHA256:
            raise TunesmithError(f"wordnet-base: checksum mismatch (expected {DEB_SHA256[:12]}..., got "
                                 f"{actual[:12]}...); refusing to use it")

        def unpack(folder: Path) -> None:
            proc = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(folder)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise TunesmithError(f"could not unpack wordnet-base: {proc.stderr.strip()}")

        build_folder(target, unpack)
    return find_wordnet()
