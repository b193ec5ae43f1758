"""Reading tabular files (CSV, TSV, JSONL, Parquet) and checking them, with errors that point at
the file, the line (or row) and the column."""

from __future__ import annotations

import csv
import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import inputs
from .errors import TunesmithError, not_found

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq")


@dataclass
class Table:
    """A DataFrame plus where its rows came from, for error messages."""
    df: pd.DataFrame
    path: Path | str               # a file, or the name of in-memory data ("data.train (DataFrame)")
    line_of_row: list[int] | None  # source line per row (text formats); None for Parquet and memory
    row_names: list[str] | None = None  # in-memory data: how each row is named ("index 17", "item 3")

    def where(self, row: int, column: str | None = None) -> str:
        if self.line_of_row is not None:
            at = f"line {self.line_of_row[row]}"
        elif self.row_names is not None:
            at = self.row_names[row]
        else:
            at = f"row {row + 1}"
        col = f", column '{column}'" if column else ""
        return f"{self.path}, {at}{col}"

    def column(self, name: str, role: str) -> pd.Series:
        if name not in self.df.columns:
            columns = [str(c) for c in self.df.columns]
            close = difflib.get_close_matches(name, columns, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise TunesmithError(f"{self.path}: no {role} column '{name}' (columns: {', '.join(columns)}){hint}")
        return self.df[name]


def read_table(path: str | Path) -> Table:
    if inputs.is_token(path):  # a DataFrame, list or Dataset given to the Python API
        frame, name, rows = inputs.lookup(str(path))
        return Table(frame, name, None, rows)
    path = Path(path)
    if not path.exists():
        raise not_found(path)
    if path.is_dir():
        raise TunesmithError(f"{path}: is a folder, expected a .csv, .tsv, .jsonl or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise TunesmithError(f"{path}: unsupported file type '{suffix}' (use {', '.join(TABLE_SUFFIXES)})")
    if path.stat().st_size == 0:
        raise TunesmithError(f"{path}: file is empty")
    if suffix in (".parquet", ".pq"):
        table = _read_parquet(path)
    elif suffix in (".jsonl", ".json"):
        table = _read_jsonl(path)
    else:
        text = _decode_utf8(path)
        if not text.strip():
            raise TunesmithError(f"{path}: file is empty")
        table = _read_delimited(path, text, "\t" if suffix == ".tsv" else ",")
    if len(table.df) == 0:
        raise TunesmithError(f"{path}: no data rows (only a header?)")
    return table


def read_text_lines(path: str | Path, column: str) -> Table:
    """A plain text file as a one-column table: one text per non-empty line (raw text for language
    modelling); each row keeps its line number for error messages."""
    path = Path(path)
    if not path.is_file():
        raise not_found(path) if not path.is_dir() else TunesmithError(f"{path}: is a folder, expected a .txt file")
    lines = _decode_utf8(path).splitlines()
    kept = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not kept:
        raise TunesmithError(f"{path}: file is empty" if not lines else f"{path}: no text (only blank lines)")
    return Table(pd.DataFrame({column: [line for _, line in kept]}), path, [n for n, _ in kept])


def _decode_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:  # no read permission, a file that vanished, an I/O error
        raise TunesmithError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise TunesmithError(f"{path}, line {line}, byte {col}: not valid UTF-8 "
                             f"(byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")


def _read_delimited(path: Path, text: str, sep: str) -> Table:
    # The csv module gives exact line numbers (quoted fields may span lines) and
    # catches rows with the wrong number of fields, which pandas would reject vaguely.
    # The csv module refuses a field over 128 KiB (its default limit) as malformed; no field can be longer
    # than the file, so the limit is raised to the file's length (it is process-wide: only ever raised).
    if len(text) > csv.field_size_limit():
        csv.field_size_limit(min(len(text) + 1, 2**31 - 1))
    # Lines are cut lazily where io.StringIO(newline="") cuts them (\n, \r\n, \r): a StringIO holds another copy
    # of the whole text at 4 bytes per character. A 2 MB cell: peak 11.2x the file's size before, 7.2x now
    # (most of the rest is the csv module's own 4-bytes-per-character buffer for the field).
    reader = csv.reader((m.group() for m in _LINE.finditer(text)), delimiter=sep)
    try:
        header = next(reader)
        if sep == "," and len(header) == 1 and "\t" in header[0]:  # a TSV file named .csv
            raise TunesmithError(f"{path}, line 1: one column named {header[0][:60]!r}: the file looks "
                                 "tab-separated; name it .tsv")
        rows, lines = [], []
        start = reader.line_num + 1
        for row in reader:
            if not row or (len(row) == 1 and row[0] == ""):
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise TunesmithError(f"{path}, line {start}: expected {len(header)} fields "
                                     f"({sep.join(header)!r}), found {len(row)}")
            rows.append(row)
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise TunesmithError(f"{path}, line {reader.line_num}: malformed row: {exc}") from None
    header = [h.strip() for h in header]
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise TunesmithError(f"{path}, line 1: duplicate column name(s): {', '.join(duplicated)}")
    return Table(pd.DataFrame(rows, columns=header, dtype=object), path, lines)


def _read_jsonl(path: Path) -> Table:
    """One JSON object per line, read a line at a time into columns: the file is never held whole (as
    bytes, text or a list of lines), which kept several copies of a large file in memory."""
    columns: dict[str, list] = {}
    lines: list[int] = []
    try:
        f = open(path, "rb")
    except OSError as exc:  # no read permission, a file that vanished, an I/O error
        raise TunesmithError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise TunesmithError(f"{path}, line {number}, byte {exc.start + 1}: not valid UTF-8 "
                                     f"(byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunesmithError(f"{path}, line {number}, char {exc.colno}: invalid JSON: {exc.msg}") from None
            except RecursionError:
                raise TunesmithError(f"{path}, line {number}: values nested too deeply") from None
            if not isinstance(record, dict):
                raise TunesmithError(f"{path}, line {number}: expected a JSON object per line, got {type(record).__name__}")
            for key in record:
                if key not in columns:  # a key first seen here: earlier rows lack it
                    columns[key] = [None] * len(lines)
            for key, values in columns.items():
                values.append(record.get(key))
            lines.append(number)
    if not lines:
        raise TunesmithError(f"{path}: file is empty")
    return Table(pd.DataFrame(columns), path, lines)


def _read_parquet(path: Path) -> Table:
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise TunesmithError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return Table(df.reset_index(drop=True), path, None)


# ---------------------------------------------------------------- column checks

def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_values(table: Table, column: str, role: str = "text") -> list[str]:
    """The column as a list of non-empty strings, or an error naming the first bad row."""
    values = table.column(column, role).tolist()
    for i, value in enumerate(values):
        if _missing(value):
            raise TunesmithError(f"{table.where(i, column)}: missing {role}")
        if not isinstance(value, str):
            raise TunesmithError(f"{table.where(i, column)}: {role} must be a string, got {value!r}")
        if not value.strip():
            raise TunesmithError(f"{table.where(i, column)}: empty {role}")
    return values


def label_names(table: Table, column: str) -> list[str]:
    """Single-label values normalised to strings: 1, 1.0 and '1' are all the label '1'."""
    out = []
    for i, value in enumerate(table.column(column, "label").tolist()):
        name = _label_name(value)
        if name is None:
            raise TunesmithError(f"{table.where(i, column)}: missing label")
        out.append(name)
    return out


def _label_name(value: object) -> str | None:
    if _missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else str(value)
    if isinstance(value, str):
        return value.strip() or None
    return str(value)


def multi_label_names(table: Table, column: str, separator: str) -> list[list[str]]:
    """Lists of labels: a JSON list, or a string like 'a|b' (an empty string means no label)."""
    out = []
    for i, value in enumerate(table.column(column, "label").tolist()):
        if isinstance(value, (list, tuple, np.ndarray)):
            names = [_label_name(v) for v in value]
            if any(n is None for n in names):
                raise TunesmithError(f"{table.where(i, column)}: empty label in list {list(value)!r}")
        elif isinstance(value, str):
            names = [p.strip() for p in value.split(separator) if p.strip()]
        elif _missing(value):
            names = []
        else:
            raise TunesmithError(f"{table.where(i, column)}: expected a list of labels or a "
                                 f"'{separator}'-separated string, got {value!r}")
        out.append(list(dict.fromkeys(names)))
    return out


def float_values(table: Table, column: str) -> list[float]:
    out = []
    for i, value in enumerate(table.column(column, "label").tolist()):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not math.isfinite(number):
            raise TunesmithError(f"{table.where(i, column)}: regression target must be a finite number, got {value!r}")
        out.append(number)
    return out


def sort_labels(names: set[str]) -> list[str]:
    """Numeric-looking labels in numeric order, others alphabetically."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)
