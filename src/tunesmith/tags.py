"""Entity tag schemes: IO, BIO (IOB2), IOB1 and BIOES.

Every scheme is read into entity spans `(type, start, end)` (end exclusive) and written back from
them, so converting between schemes is `from_spans(to_spans(tags, a), n, b)`. Models train on BIO;
predictions are written back in the scheme of the user's data.

    tokens   New   York   is   nice
    IO       I-LOC I-LOC  O    O       (two adjacent entities of one type cannot be told apart)
    BIO      B-LOC I-LOC  O    O       (every entity starts with B-)
    IOB1     I-LOC I-LOC  O    O       (B- only where an entity directly follows one of its type)
    BIOES    B-LOC E-LOC  O    O       (single-token entities are S-)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SCHEMES = ("IO", "BIO", "IOB1", "BIOES")
_PREFIXES = {"IO": "I", "BIO": "BI", "IOB1": "BI", "BIOES": "BIES"}

Span = tuple[str, int, int]


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). Raises ValueError for anything else."""
    if tag == "O":
        return "O", ""
    prefix, dash, kind = tag.partition("-")
    if not dash or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"tag '{tag}' is not 'O' or PREFIX-TYPE with PREFIX one of B, I, E, S")
    return prefix, kind


def detect_scheme(sentences: Iterable[Sequence[str]]) -> str:
    """The scheme a corpus is written in (tags must already pass split_tag).

    E-/S- tags mean BIOES; no B- at all means IO; B- only ever directly after an entity of its own
    type means IOB1 (there B- separates adjacent entities); any B- after O or another type means BIO.
    """
    seen_b, b_starts_entity = False, False
    for tags in sentences:
        prev = ("O", "")
        for tag in tags:
            cur = split_tag(tag)
            if cur[0] in "ES":
                return "BIOES"
            if cur[0] == "B":
                seen_b = True
                b_starts_entity |= prev[1] != cur[1]
            prev = cur
    if not seen_b:
        return "IO"
    return "BIO" if b_starts_entity else "IOB1"


def to_spans(tags: Sequence[str], scheme: str) -> tuple[list[Span], list[tuple[int, str]]]:
    """Entity spans, plus (index, message) for each tag that breaks the scheme.

    Broken tags are read the usual lenient way (an entity starts where its tag says one is going
    on), which is the repair `data.repair_tags` applies.
    """
    allowed = _PREFIXES[scheme]
    spans: list[Span] = []
    problems: list[tuple[int, str]] = []
    start, kind = None, ""  # the open entity

    def close(end: int) -> None:
        nonlocal start, kind
        if start is not None:
            spans.append((kind, start, end))
        start, kind = None, ""

    for i, tag in enumerate(tags):
        prefix, t = split_tag(tag)
        prev = tags[i - 1] if i else "the sentence start"
        if prefix != "O" and prefix not in allowed:
            problems.append((i, f"tag '{tag}' has a prefix that scheme {scheme} does not use"))
        if prefix == "O":
            if scheme == "BIOES" and start is not None:
                problems.append((i - 1, f"entity '{kind}' ends with '{tags[i - 1]}' instead of E-{kind}"))
            close(i)
        elif prefix == "S":
            if scheme == "BIOES" and start is not None:
                problems.append((i - 1, f"entity '{kind}' ends with '{tags[i - 1]}' instead of E-{kind}"))
            close(i)
            spans.append((t, i, i + 1))
        elif prefix == "B":
            if scheme == "IOB1" and kind != t:
                problems.append((i, f"tag '{tag}' follows '{prev}': in IOB1, B- only separates two adjacent "
                                    f"entities of one type (an entity starts with I-)"))
            if scheme == "BIOES" and start is not None:
                problems.append((i - 1, f"entity '{kind}' ends with '{tags[i - 1]}' instead of E-{kind}"))
            close(i)
            start, kind = i, t
        else:  # I or E: continues an open entity of the same type
            if kind != t:
                if scheme in ("BIO", "BIOES"):
                    problems.append((i, f"tag '{tag}' follows '{prev}' (invalid in {scheme}: "
                                        f"an entity starts with B-{t})"))
                close(i)
                start, kind = i, t
            if prefix == "E":
                close(i + 1)
    if scheme == "BIOES" and start is not None:
        problems.append((len(tags) - 1, f"entity '{kind}' ends with '{tags[-1]}' instead of E-{kind}"))
    close(len(tags))
    return spans, problems


def from_spans(spans: Iterable[Span], n: int, scheme: str) -> list[str]:
    """Tags for a sentence of n tokens holding these (non-overlapping) spans."""
    tags = ["O"] * n
    ordered = sorted(spans, key=lambda s: s[1])
    for k, (kind, start, end) in enumerate(ordered):
        follows_same = k > 0 and ordered[k - 1][2] == start and ordered[k - 1][0] == kind
        for i in range(start, end):
            tags[i] = f"I-{kind}"
        if scheme == "BIO" or (scheme == "IOB1" and follows_same):
            tags[start] = f"B-{kind}"
        elif scheme == "BIOES":
            if end - start == 1:
                tags[start] = f"S-{kind}"
            else:
                tags[start], tags[end - 1] = f"B-{kind}", f"E-{kind}"
    return tags


def convert(tags: Sequence[str], source: str, target: str) -> list[str]:
    """Rewrite tags from one scheme to another (broken tags are repaired on the way)."""
    return from_spans(to_spans(tags, source)[0], len(tags), target)


def bio_names(types: Iterable[str]) -> list[str]:
    """The BIO tag set a model predicts: O first, then B-/I- per type in sorted order."""
    return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in "BI"]


def bio_decode(log_probs: np.ndarray, names: Sequence[str]) -> list[int]:
    """The most probable BIO-valid tag sequence (Viterbi): no I-X after O or after another type.

    Taking the best tag per token can yield 'O I-PER', which strict entity scoring throws away;
    decoding under the BIO rules keeps the output a set of well-formed entities.
    """

    n, c = log_probs.shape
    if n == 0:
        return []
    parsed = [split_tag(t) for t in names]
    # ok[p, q]: tag q may follow tag p; a sentence may not start with I-.
    ok = np.array([[q[0] != "I" or (p[0] in "BI" and p[1] == q[1]) for q in parsed] for p in parsed])
    start_ok = np.array([q[0] != "I" for q in parsed])
    blocked = np.float32(-1e9)
    score = np.where(start_ok, log_probs[0], blocked)
    back = np.zeros((n, c), dtype=np.int64)
    for i in range(1, n):
        cand = score[:, None] + np.where(ok, 0.0, blocked)  # [prev, cur]
        back[i] = cand.argmax(axis=0)
        score = cand.max(axis=0) + log_probs[i]
    path = [int(score.argmax())]
    for i in range(n - 1, 0, -1):
        path.append(int(back[i, path[-1]]))
    return path[::-1]
