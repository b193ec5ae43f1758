"""Text augmentation, applied on the fly to training examples only.

Each epoch the training set is rewritten afresh: every operation of `augment:` fires on an example with
its probability p, using a random generator seeded by (train.seed, epoch, example, operation), so an
epoch's texts are the same in every run and after a resume. Operations work on words (text
classification: the text split on whitespace; NER: the tokens) and, for NER, keep tags aligned: they
only touch words tagged O, and insert only where no entity is split (never before an I- word).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import TunesmithError

Words = list[str]
Tags = list[str] | None

# Function words: WordNet has odd senses for some ('a' = vitamin A, 'it' = information technology).
STOPWORDS = frozenset("""a an the and or but if then else of at by for with about against between into through
during before after above below to from up down in out on off over under again further once here there when
where why how all any both each few more most other some such no nor not only own same so than too very can
will just don should now i me my myself we our ours you your yours he him his she her hers it its they them
their what which who whom this that these those am is are was were be been being have has had having do does
did doing would could ought s t""".split())
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)  # leading punctuation, the word, trailing punctuation


class Augmenter:
    def __init__(self, ops: Sequence, seed: int, wordnet_dir: str | Path | None = None):
        self.ops, self.seed = list(ops), seed % 2**32
        self.wordnet = None
        if any(op.op in ("insert", "synonym") for op in self.ops):
            from . import wordnet
            self.wordnet = wordnet.load(str(wordnet_dir) if wordnet_dir else None)
        self.mlm = {op.model: MaskedLM(op.model) for op in self.ops if op.op == "contextual"}

    def describe(self) -> str:
        return ", ".join(f"{op.op} (p {op.p})" for op in self.ops)

    def apply(self, task, examples, epoch: int):
        """The examples with this epoch's augmentation (task.map_words rewrites the words)."""
        return task.map_words(examples, lambda words, tags: self.augment(words, tags, epoch))

    def augment(self, words: list[Words], tags: list[Tags] | None, epoch: int) -> tuple[list[Words], list[Tags] | None]:
        tagged = tags is not None
        words = [list(w) for w in words]
        tags = [list(t) for t in tags] if tagged else [None] * len(words)
        for k, op in enumerate(self.ops):
            rngs = [np.random.default_rng([self.seed, epoch, i, k]) for i in range(len(words))]
            chosen = [i for i, rng in enumerate(rngs) if rng.random() < op.p]
            if op.op == "contextual":
                self.mlm[op.model].replace(op, [words[i] for i in chosen], [tags[i] for i in chosen],
                                           [rngs[i] for i in chosen])
                continue
            for i in chosen:
                words[i], tags[i] = OPS[op.op](self, op, words[i], tags[i], rngs[i])
        return words, (tags if tagged else None)

    # ---- single-example operations: (words, tags, rng) -> (words, tags)

    def swap(self, op, words: Words, tags: Tags, rng) -> tuple[Words, Tags]:
        free = _free(words, tags)
        for _ in range(op.n if len(free) >= 2 else 0):
            a, b = rng.choice(free, size=2, replace=False)
            words[a], words[b] = words[b], words[a]
        return words, tags

    def delete(self, op, words: Words, tags: Tags, rng) -> tuple[Words, Tags]:
        free = _free(words, tags)
        drop = {i for i in free if rng.random() < op.rate}
        if len(drop) == len(words):  # keep one word
            drop.discard(free[rng.integers(len(free))])
        keep = [i for i in range(len(words)) if i not in drop]
        return [words[i] for i in keep], (None if tags is None else [tags[i] for i in keep])

    def synonym(self, op, words: Words, tags: Tags, rng) -> tuple[Words, Tags]:
        """Replace up to n words by a WordNet synonym (a multi-word synonym becomes several O words)."""
        picked: dict[int, list[str]] = {}
        for i in rng.permutation(_free(words, tags)).tolist():
            if len(picked) == op.n:
                break
            new = self._synonym_of(words[i], rng)
            if new is not None:
                picked[i] = new.split()
        out_words = [w for i, word in enumerate(words) for w in picked.get(i, [word])]
        out_tags = None if tags is None else [t for i, tag in enumerate(tags) for t in [tag] * len(picked.get(i, [0]))]
        return out_words, out_tags

    def insert(self, op, words: Words, tags: Tags, rng) -> tuple[Words, Tags]:
        """Insert a synonym of one of the example's (O) words at a random place outside any entity."""
        for _ in range(op.n):
            free = _free(words, tags)
            found = None
            for i in rng.permutation(free).tolist() if free else []:
                found = self._synonym_of(words[i], rng)
                if found is not None:
                    break
            if found is None:
                break
            slots = [k for k in range(len(words) + 1) if tags is None or k == len(words) or not tags[k].startswith("I-")]
            k = int(rng.choice(slots))
            new = found.split()
            words = words[:k] + new + words[k:]
            tags = None if tags is None else tags[:k] + ["O"] * len(new) + tags[k:]
        return words, tags

    def _synonym_of(self, word: str, rng) -> str | None:
        """A random WordNet synonym, keeping the word's punctuation and capital; None when there is none."""
        head, core, tail = _CORE.match(word).groups()
        if not core.isalpha() or core.lower() in STOPWORDS:
            return None
        options = [s for s in self.wordnet.synonyms(core) if s.replace(" ", "").replace("-", "").isalpha()]
        if not options:
            return None
        choice = options[int(rng.integers(len(options)))]
        if core[0].isupper():
            choice = choice[0].upper() + choice[1:]
        return head + choice + tail


OPS = {"swap": Augmenter.swap, "delete": Augmenter.delete, "synonym": Augmenter.synonym, "insert": Augmenter.insert}


def _free(words: Words, tags: Tags) -> list[int]:
    """Positions an operation may touch: every word, or (NER) the words tagged O."""
    return list(range(len(words))) if tags is None else [i for i, t in enumerate(tags) if t == "O"]


class MaskedLM:
    """Contextual replacement: mask one word, let a masked-LM propose a whole word in its place."""

    def __init__(self, name: str):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from .models import from_pretrained, resolve_model

        source = resolve_model(name)
        self.tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source)
        if self.tokenizer.mask_token is None:
            raise TunesmithError(f"augment contextual: model '{name}' has no mask token (not a masked-LM)")
        model, info = from_pretrained(AutoModelForMaskedLM.from_pretrained, source, output_loading_info=True,
                                      use_safetensors=True)
        head = [k for k in info["missing_keys"] if not k.startswith(model.base_model_prefix + ".")]
        if head:  # e.g. a sentence-embedding model: its masked-LM head would be random
            raise TunesmithError(f"augment contextual: model '{name}' has no trained masked-LM head "
                                 f"(missing {head[0]}); give a masked-LM such as a BERT or RoBERTa checkpoint")
        self.model = model.eval()
        self.torch = torch
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        # whole words only: not a continuation piece ('##ing'), letters only (after a RoBERTa 'Ġ' space marker)
        self.whole = np.asarray([t is not None and not t.startswith("##") and t.lstrip("Ġ▁").isalpha()
                                 and t not in self.tokenizer.all_special_tokens for t in vocab])
        self.vocab = [None if t is None else t.lstrip("Ġ▁") for t in vocab]

    def replace(self, op, words: list[Words], tags: list[Tags], rngs: list) -> None:
        """In place: up to op.n words per example, one masked at a time, batched across examples."""
        order = [rng.permutation(_free(w, t)).tolist() if w else [] for w, t, rng in zip(words, tags, rngs)]
        for round_ in range(op.n):
            todo = [(e, order[e][round_]) for e in range(len(words)) if round_ < len(order[e])]
            todo = [(e, i) for e, i in todo if _CORE.match(words[e][i]).group(2).isalpha()]
            for start in range(0, len(todo), 32):
                chunk = todo[start:start + 32]
                texts = [" ".join(words[e][:i] + [self.tokenizer.mask_token] + words[e][i + 1:]) for e, i in chunk]
                enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
                with self.torch.inference_mode():
                    logits = self.model(**enc).logits.float()
                for row, (e, i) in enumerate(chunk):
                    where = (enc["input_ids"][row] == self.tokenizer.mask_token_id).nonzero()
                    if len(where) == 0:  # the masked word lay past the length limit
                        continue
                    head, core, tail = _CORE.match(words[e][i]).groups()
                    scores = logits[row, where[0, 0]].numpy().copy()
                    scores[~self.whole] = -np.inf
                    ranked = [k for k in np.argsort(-scores, kind="stable")[:op.top_k + 1]
                              if np.isfinite(scores[k]) and self.vocab[k].lower() != core.lower()][:op.top_k]
                    if not ranked:
                        continue
                    new = self.vocab[ranked[int(rngs[e].integers(len(ranked)))]]
                    if core[0].isupper():
                        new = new[0].upper() + new[1:]
                    words[e][i] = head + new + tail


@lru_cache(maxsize=4)
def _cached(ops_json: str, seed: int) -> Augmenter:
    from pydantic import TypeAdapter

    from .config import AugmentOp
    return Augmenter(TypeAdapter(list[AugmentOp]).validate_python(json.loads(ops_json)), seed)


def augmenter_for(ops: Sequence, seed: int) -> Augmenter:
    """The Augmenter of these operations, built once (WordNet and a masked LM load slowly)."""
    return _cached(json.dumps([op.model_dump() for op in ops], sort_keys=True), seed)


def preview_lines(task, examples, augmenter: Augmenter, n: int, epoch: int = 0) -> list[str]:
    """'original' / 'augmented' line pairs for the first n training examples this epoch changes."""
    augmented = augmenter.apply(task, examples, epoch)
    lines = []
    for before, after in zip(task.show_examples(examples), task.show_examples(augmented)):
        if before != after:
            lines += [f"  original:  {before}", f"  augmented: {after}", ""]
            if len(lines) >= 3 * n:
                break
    return lines
