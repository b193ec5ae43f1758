"""Property-based fuzzing (Hypothesis) of what reads user files: the config loader (YAML text ->
load_config) and the data readers (CSV / TSV / JSONL / CoNLL bytes -> the tasks' read_examples). The only
outcomes allowed are success or a TunesmithError whose message is one non-empty line: never another
exception type, a hang (each example has a deadline, the test a timeout) or memory far past the input's size.

Default: a few dozen examples per test (seconds). TUNESMITH_FUZZ_EXAMPLES=5000 runs the long campaign
(docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import tempfile
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.tasks import text_classification, token_classification

EXAMPLES = int(os.environ.get("TUNESMITH_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=10), derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)
# the whole test: generous for the long campaign, still a bound on a hang
pytestmark = pytest.mark.timeout(max(120, EXAMPLES * 2))

BOM = "\ufeff"


def _outcome(call) -> object:
    """Run call(); a TunesmithError must be one non-empty line. Anything else raised fails the test."""
    try:
        return call()
    except TunesmithError as exc:
        message = str(exc)
        assert message.strip() and len(message.splitlines()) == 1, repr(message)
        return exc


def _file(folder: str, name: str, content: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(content)
    return path


# ---------------------------------------------------------------- config

_SECTIONS = ["task", "model", "data", "train", "output", "search", "token_classification", "augment", "lora"]
_KEYS = ["name", "train", "test", "validation_fraction", "lr", "epochs", "batch_size", "max_steps", "seed",
         "precision", "dir", "text_column", "label_column", "strategy", "refit", "time_limit", "format"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=30), st.sampled_from(["auto", "1e-3", "3e-5", "20m", "fp32", "bf16", "..",
                                                            "/abs", "a/b", "", "~", "0x1f", "1_000"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_CONFIGS = st.dictionaries(st.sampled_from(_SECTIONS) | st.text(max_size=8),
                           st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=5) | _VALUES, max_size=5)


def _load_yaml_bytes(content: bytes):
    with tempfile.TemporaryDirectory() as d:
        return _outcome(lambda: load_config(_file(d, "cfg.yaml", content)))


@FUZZ
@given(st.binary(max_size=600))
@example(b"")
@example(b"\xff\xfe\x00")
@example(b"\x00")
@example(b"[" * 5000)
@example(b"a: &a [x]\nb: *a\n")
def test_config_from_arbitrary_bytes(content):
    _load_yaml_bytes(content)


@FUZZ
@given(st.text(max_size=400))
@example("train: {lr: 0.5}\ntrain: {batch_size: 8}\n")
@example("? [a, b]\n: 1\n")
@example("!!python/object/apply:os.system ['true']\n")
@example("data: {train: x.csv}\n<<: {data: 1}\n")
def test_config_from_arbitrary_text(text):
    _load_yaml_bytes(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(_CONFIGS, st.booleans(), st.sampled_from(["", BOM]), st.sampled_from(["\n", "\r\n"]))
def test_config_from_structured_yaml(raw, flow, bom, newline):
    text = yaml.safe_dump(raw, default_flow_style=flow, allow_unicode=True)
    _load_yaml_bytes((bom + text.replace("\n", newline)).encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------- tables (CSV, TSV, JSONL)

_CELLS = st.one_of(st.text(max_size=12), st.sampled_from(
    ["pos", "neg", "good film", "", " ", '"', '""', '"a,b"', "a\nb", "\r", "\x00", BOM, "\t", "NaN", "null",
     "1", "1.0", "-0", "true", "[]", '["a"]', "é", "\udcff"[:0] + "\u2028", "text", "label"]))
_HEADERS = st.lists(st.sampled_from(["text", "label", "film", "", "text ", " label", "Text", "group", "x"]),
                    min_size=0, max_size=4)


def _quote(cell: str, style: str) -> str:
    if style == "quoted":
        return '"' + cell.replace('"', '""') + '"'
    if style == "broken":  # an opening quote never closed, or one quote not doubled
        return '"' + cell
    return cell


@st.composite
def delimited(draw, sep: str) -> bytes:
    header = draw(_HEADERS)
    width = len(header) or 1
    rows = draw(st.lists(st.lists(_CELLS, min_size=max(0, width - 1), max_size=width + 1), max_size=6))
    style = st.sampled_from(["plain", "plain", "quoted", "broken"])
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    lines = [sep.join(_quote(c, draw(style)) for c in row) for row in [header] + rows]
    text = draw(st.sampled_from(["", BOM])) + newline.join(lines) + draw(st.sampled_from(["", newline]))
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16", "latin-1"])), "replace")


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=8)


@st.composite
def jsonl(draw) -> bytes:
    keys = st.sampled_from(["text", "label", "tokens", "tags", "film"]) | st.text(max_size=5)
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["record", "record", "record", "junk", "blank", "duplicate"]))
        if kind == "record":
            lines.append(json.dumps(draw(st.dictionaries(keys, _JSON, max_size=4)), allow_nan=True))
        elif kind == "duplicate":  # a key twice in one object: json.loads keeps the last
            lines.append('{"text": "a", "text": "b", "label": 1}')
        elif kind == "junk":
            lines.append(draw(st.text(max_size=20)))
        else:
            lines.append("")
    return (draw(st.sampled_from(["", BOM])) + "\n".join(lines)).encode("utf-8", "surrogatepass")


def _read_text_examples(name: str, content: bytes, **data) -> object:
    with tempfile.TemporaryDirectory() as d:
        path = _file(d, name, content)
        cfg = load_config({"data": {"train": str(path), **data}})
        return _outcome(lambda: text_classification.read_examples(str(path), cfg, None, require_labels=True))


@FUZZ
@given(st.sampled_from(["d.csv", "d.tsv", "d.jsonl", "d.json", "d.parquet"]), st.binary(max_size=800))
@example("d.csv", b"\x00\x00")
@example("d.csv", b"text,label\n\x00,pos\n")
@example("d.parquet", b"PAR1\x00\x00PAR1")
def test_table_from_arbitrary_bytes(name, content):
    _read_text_examples(name, content)


@FUZZ
@given(st.sampled_from([("d.csv", ","), ("d.tsv", "\t")]).flatmap(
    lambda pair: st.tuples(st.just(pair[0]), delimited(pair[1]))),
    st.sampled_from(["single_label", "multi_label", "regression"]))
@example(("d.csv", b"text,text,label\na,b,pos\n"), "single_label")
@example(("d.csv", b'text,label\n"a,pos\n'), "single_label")
@example(("d.csv", b'"text\n\n,"\n"\n'), "single_label")  # a column name with newlines, echoed in the error
def test_table_from_structured_delimited(file, problem_type):
    _read_text_examples(*file, problem_type=problem_type)


@FUZZ
@given(jsonl(), st.sampled_from(["single_label", "multi_label", "regression"]))
@example(b'{"text": "a", "label": {"x": 1}}\n{"text": "b", "label": [1]}', "single_label")
@example(b'{"text": "a", "label": 1e999}', "regression")
@example(b"[" * 100_000, "single_label")  # was a RecursionError from the json module
@example(b'{"\\n": null}', "single_label")  # a column named with a newline: the error stays one line
def test_table_from_structured_jsonl(content, problem_type):
    _read_text_examples("d.jsonl", content, problem_type=problem_type)


@pytest.mark.parametrize("name,make", [
    ("d.csv", lambda cell: f'text,label\n"{cell}",pos\nb,neg\n'),
    ("d.tsv", lambda cell: f"text\tlabel\n{cell}\tpos\nb\tneg\n"),
    ("d.jsonl", lambda cell: json.dumps({"text": cell, "label": "pos"}) + '\n{"text": "b", "label": "neg"}\n'),
])
def test_a_huge_field_reads_within_a_memory_bound(name, make, tmp_path):
    content = make("word " * 400_000).encode()  # a 2 MB cell
    path = _file(str(tmp_path), name, content)
    cfg = load_config({"data": {"train": str(path)}})
    tracemalloc.start()
    try:
        examples = _outcome(lambda: text_classification.read_examples(str(path), cfg, None))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(examples.texts[0]) == 2_000_000
    # measured: 7.2x the file for CSV/TSV (the csv module buffers a field at 4 bytes per character; 11.2x
    # before the reader stopped copying the text into a StringIO), 3.0x for JSONL
    assert peak < 8 * len(content), f"{name}: peak {peak:,} bytes for a {len(content):,}-byte file"


# ---------------------------------------------------------------- token classification (CoNLL, JSONL)

_TOKENS = st.one_of(st.text(max_size=8), st.sampled_from(["EU", "rejects", "German", "-DOCSTART-", ".", "", " "]))
_TAGS = st.one_of(st.text(max_size=6), st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-ORG", "E-LOC",
                                                        "S-PER", "B-", "I-", "-", "B-PER-X", "O "]))


@st.composite
def conll(draw) -> bytes:
    sep = draw(st.sampled_from(["\t", " ", "  "]))
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["token", "token", "token", "blank", "docstart", "junk"]))
        if kind == "token":
            cols = [draw(_TOKENS)] + [draw(_TAGS) for _ in range(draw(st.integers(0, 3)))]
            lines.append(sep.join(cols))
        elif kind == "blank":
            lines.append(draw(st.sampled_from(["", " ", "\t"])))
        elif kind == "docstart":
            lines.append("-DOCSTART- -X- O O")
        else:
            lines.append(draw(st.text(max_size=15)))
    text = draw(st.sampled_from(["", BOM])) + draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    return text.encode("utf-8", "surrogatepass")


def _read_token_examples(name: str, content: bytes, **options) -> object:
    with tempfile.TemporaryDirectory() as d:
        path = _file(d, name, content)
        cfg = load_config({"task": "token_classification", "data": {"train": str(path)},
                           "token_classification": options})
        return _outcome(lambda: token_classification.read_examples(str(path), cfg, None, require_labels=True))


@FUZZ
@given(st.sampled_from(["d.conll", "d.txt", "d.jsonl", "d.csv"]), st.binary(max_size=600))
@example("d.conll", b"\x00\t\x00\n")
def test_token_data_from_arbitrary_bytes(name, content):
    _read_token_examples(name, content)


@FUZZ
@given(conll(), st.sampled_from(["auto", "BIO", "IOB1", "BIOES"]), st.booleans())
@example(b"EU\tB-ORG\n\nrejects\tO\n", "auto", False)
@example(b"0\tI-0\n\n\n0\t0", "auto", False)  # a scheme error, then a bad tag in a later sentence: was a ValueError
def test_token_data_from_structured_conll(content, scheme, repair):
    _read_token_examples("d.conll", content, tag_scheme=scheme, repair_tags=repair)


@st.composite
def token_jsonl(draw) -> bytes:
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        tokens = draw(st.lists(_TOKENS, max_size=4) | _JSON)
        tags = draw(st.lists(_TAGS, max_size=4) | _JSON)
        row = {"tokens": tokens, "tags": tags}
        for key in draw(st.sets(st.sampled_from(["tokens", "tags"]), max_size=1)):
            del row[key]  # a missing column
        rows.append(json.dumps(row))
    return "\n".join(rows).encode("utf-8", "surrogatepass")


@FUZZ
@given(token_jsonl(), st.booleans())
def test_token_data_from_structured_jsonl(content, repair):
    _read_token_examples("d.jsonl", content, repair_tags=repair)
