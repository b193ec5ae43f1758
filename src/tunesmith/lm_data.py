"""Supervised fine-tuning data for causal language models: reading prompt/completion rows, chat records
and plain texts (with errors naming the file, row and column), and rendering one example into segments
of text that the model reads (context) or learns to write (target).

Rendering is done in pieces so that the loss mask is exact: a chat is rendered with the model's chat
template one assistant turn at a time (the text before a turn, with the generation prompt, is context;
the turn up to and including the end-of-sequence token is target), which also makes the prompt that
generation sees token for token the prefix that training saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from . import inputs
from .config import Config
from .data import Table, read_table, text_values
from .errors import TunesmithError

ROLES = ("system", "user", "assistant")
KINDS = ("pair", "chat", "text")  # prompt/completion rows, chat records, plain text


@dataclass
class Examples:
    """One split of SFT data. `targets` are the reference answers (a pair's completion, a chat's last
    assistant turn), None when there are none (plain text, or prompts to complete)."""
    table: Table
    kind: str
    prompts: list[str] | None = None              # pair
    completions: list[str] | None = None          # pair (None: prompts to complete)
    messages: list[list[dict]] | None = None      # chat
    texts: list[str] | None = None                # text
    groups = None                                 # no grouping of rows

    def __len__(self) -> int:
        return len(self.table.df)

    @property
    def targets(self) -> list[str] | None:
        if self.kind == "pair":
            return self.completions
        if self.kind == "chat":
            last = [m[-1] for m in self.messages]
            return [m["content"] for m in last] if all(m["role"] == "assistant" for m in last) else None
        return None

    def subset(self, idx: np.ndarray) -> "Examples":
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        t = self.table
        table = Table(t.df.iloc[idx].reset_index(drop=True), t.path, pick(t.line_of_row), pick(t.row_names))
        return Examples(table, self.kind, pick(self.prompts), pick(self.completions), pick(self.messages),
                        pick(self.texts))


def read_examples(source, cfg: Config, require_labels: bool = True) -> Examples:
    """Prompt/completion rows (a `messages` column makes them chats; a text column alone is plain text).
    Without `require_labels` (predict), completions are optional and a plain text is a prompt."""
    opts = cfg.causal_lm
    if inputs.is_in_memory(source):  # a DataFrame, records, or texts to complete
        name = "texts" if inputs.is_text_list(source) else "data"
        with inputs.in_memory_input(source, name, opts.prompt_column) as token:
            return read_examples(token, cfg, require_labels)
    table = read_table(source)
    columns = table.df.columns
    if opts.messages_column in columns:
        return Examples(table, "chat", messages=_chats(table, opts.messages_column, require_labels))
    if opts.prompt_column in columns:
        prompts = text_values(table, opts.prompt_column, "prompt")
        completions = None
        if require_labels or opts.completion_column in columns:
            completions = text_values(table, opts.completion_column, "completion")
        return Examples(table, "pair", prompts=prompts, completions=completions)
    if cfg.data.text_column in columns:
        texts = text_values(table, cfg.data.text_column)
        if not require_labels:  # predict: continue each text
            return Examples(table, "pair", prompts=texts)
        return Examples(table, "text", texts=texts)
    raise TunesmithError(f"{table.path}: no '{opts.prompt_column}' + '{opts.completion_column}', "
                         f"'{opts.messages_column}' or '{cfg.data.text_column}' column (columns: "
                         f"{', '.join(str(c) for c in columns)}); see causal_lm.prompt_column and the others")


def _chats(table: Table, column: str, require_assistant: bool) -> list[list[dict]]:
    out = []
    for i, value in enumerate(table.df[column].tolist()):
        where = table.where(i, column)
        if isinstance(value, str):  # CSV: a JSON list in a cell
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise TunesmithError(f"{where}: not a JSON list of messages ({exc.msg})") from None
        if isinstance(value, np.ndarray):  # Parquet lists
            value = value.tolist()
        if not isinstance(value, list) or not value:
            raise TunesmithError(f"{where}: expected a non-empty list of {{role, content}} messages")
        chat = []
        for k, message in enumerate(value, start=1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise TunesmithError(f"{where}: message {k} is not a {{role, content}} object")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise TunesmithError(f"{where}: message {k} has unknown role {role!r} (expected "
                                     f"{', '.join(ROLES)})")
            if not isinstance(content, str) or (role == "assistant" and not content.strip()):
                raise TunesmithError(f"{where}: message {k} ({role}) has " +
                                     ("empty content" if isinstance(content, str) else "no text content"))
            chat.append({"role": role, "content": content})
        if require_assistant and not any(m["role"] == "assistant" for m in chat):
            raise TunesmithError(f"{where}: no assistant message: nothing to learn")
        out.append(chat)
    return out


# ---------------------------------------------------------------- rendering

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(examples: Examples, tokenizer, cfg: Config, model_name: str) -> bool:
    """Whether the examples are rendered with the chat template (chats always; pairs by causal_lm.format)."""
    fmt = cfg.causal_lm.format
    if examples.kind == "text":
        return False
    if examples.kind == "chat" or fmt == "chat":
        if not has_chat_template(tokenizer):
            what = "chat records (column '" + cfg.causal_lm.messages_column + "')" if examples.kind == "chat" \
                else "causal_lm.format: chat"
            raise TunesmithError(f"{examples.table.path}: model '{model_name}' has no chat template, and {what} "
                                 "need one; use prompt/completion columns with causal_lm.format: plain, or a model "
                                 "whose tokenizer has a chat template")
        return True
    return fmt == "auto" and has_chat_template(tokenizer)


def segments(examples: Examples, i: int, tokenizer, chat: bool) -> list[tuple[str, bool]]:
    """Example i as (text, learn) pieces in reading order; the end-of-sequence token is added by the caller
    to a target piece that does not end with it."""
    if examples.kind == "text":
        return [(examples.texts[i], True)]
    if examples.kind == "pair":
        prompt = examples.prompts[i]
        completion = examples.completions[i] if examples.completions is not None else None
        if not chat:
            return [(prompt, False)] + ([(completion, True)] if completion is not None else [])
        messages = [{"role": "user", "content": prompt}]
        if completion is None:
            return [(render(tokenizer, messages, True), False)]
        return chat_segments(tokenizer, messages + [{"role": "assistant", "content": completion}], examples.table.where(i))
    messages = examples.messages[i]
    if messages[-1]["role"] != "assistant":  # predict: complete the conversation
        return chat_segments(tokenizer, messages, examples.table.where(i)) + \
            [(_rest(tokenizer, messages), False)]
    return chat_segments(tokenizer, messages, examples.table.where(i))


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def chat_segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """Context and assistant-turn pieces of a chat, rendered a turn at a time. A turn's target is its text
    up to and including the end-of-sequence token when the template writes it (ChatML's <|im_end|> is
    SmolLM2's eos), else the turn with eos appended; what the template writes after eos is context."""
    eos = tokenizer.eos_token or ""
    out, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], True) if k else render(tokenizer, [], True)
        upto = render(tokenizer, messages[:k + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise TunesmithError(f"{where}: the model's chat template renders a conversation differently from its "
                                 "beginning, so the assistant turns cannot be found in it")
        out.append((before[len(done):], False))
        turn = upto[len(before):]
        start = turn.find(message["content"])
        end = turn.find(eos, start + len(message["content"]) if start >= 0 else 0) if eos else -1
        if end >= 0:
            out.append((turn[:end + len(eos)], True))
            if turn[end + len(eos):]:
                out.append((turn[end + len(eos):], False))
        else:
            out.append((turn, True))
        done = upto
    return [(text, learn) for text, learn in out if text]


def _rest(tokenizer, messages: list[dict]) -> str:
    """What the template writes after the last assistant turn of an unfinished chat, with the generation prompt."""
    last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    done = render(tokenizer, messages[:last + 1], False) if last >= 0 else ""
    return render(tokenizer, messages, True)[len(done):]
