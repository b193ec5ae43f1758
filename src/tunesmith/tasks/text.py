"""What the two text tasks (sequence and token classification) share: the tokenizer, the input length,
padding a batch, and saying how long texts were handled. Not a task itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from ..config import Config
from ..models import from_pretrained
from .base import Encoded


# Peak learning rate per strategy when train.lr is auto (AdamW). Full fine-tuning of a pretrained encoder
# moves every weight and needs a small step; a fresh head on frozen features (linear_probe) or low-rank
# adapters (lora) start from zero-ish weights and need a much larger one (bench/README.md; lora and
# linear_probe measured at batch 32). Full fine-tuning at batch 32 and above (large data: about one pass)
# takes twice the step of batch 16: the whole Rotten Tomatoes train split, one pass of 32, gave macro F1
# 0.805 at 5e-5, 0.819 / 0.814 (seeds 0 / 1) at 1e-4 and 0.813 at 2e-4 (docs/defaults.md).
AUTO_LR = {"full": 5e-5, "freeze": 5e-5, "gradual_unfreeze": 5e-5, "lora": 5e-4, "linear_probe": 2e-3}
AUTO_LR_LARGE_BATCH = {**AUTO_LR, "full": 1e-4, "freeze": 1e-4, "gradual_unfreeze": 1e-4}
LARGE_BATCH = 32


def auto_lr(strategy: str, batch_size: int) -> float:
    """The text classification rate for a strategy at this batch size."""
    return (AUTO_LR_LARGE_BATCH if batch_size >= LARGE_BATCH else AUTO_LR)[strategy]


def load_tokenizer(source: str | Path, cfg: Config, need_fast: str | None = None):
    """The model folder's tokenizer; `need_fast` names what needs a fast (Rust) one, if anything."""
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, str(source), trust_remote_code=cfg.model.trust_remote_code)
    if need_fast and not tokenizer.is_fast:
        from ..errors import TunesmithError
        raise TunesmithError(f"model '{cfg.model.name}': {need_fast} needs a fast tokenizer")
    return tokenizer


def max_length(tokenizer, cfg: Config) -> int:
    """model.max_length, capped by what the model takes."""
    return min(cfg.model.max_length, getattr(tokenizer, "model_max_length", 10**9) or 10**9)


def pad_batch(features: list[dict], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (and token_type_ids) padded to the longest in the batch, rounded up to
    `multiple`; labels stacked as they are (token labels are padded by the token task)."""
    width = -(-max(len(f["input_ids"]) for f in features) // multiple) * multiple
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.as_tensor(f["input_ids"])
        mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if "token_type_ids" in features[0]:
        types = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            types[i, :len(f["token_type_ids"])] = torch.as_tensor(f["token_type_ids"])
        batch["token_type_ids"] = types
    return batch


def collate_with(tokenizer, multiple: int, labels: Callable[[list[dict], torch.Tensor], torch.Tensor]):
    """A collate function: pad_batch plus the task's way of batching labels (`labels(features, input_ids)`)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(features, pad_id, multiple)
        if "labels" in features[0]:
            batch["labels"] = labels(features, batch["input_ids"])
        return batch
    return collate


def stacked_labels(features: list[dict], input_ids: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.stack([f["labels"] for f in features]))


def describe_long_texts(enc: Encoded, cfg: Config) -> str:
    """How texts longer than the limit were handled, for the run log (nothing is lost silently)."""
    stride, limit = cfg.model.chunk_stride, enc.max_length
    if not enc.truncated:
        return f"none longer than {limit} tokens"
    if stride is not None:
        windows = len(enc.features) - (enc.num_examples - enc.truncated)
        return (f"{enc.truncated} longer than {limit} tokens, split into {windows} overlapping windows "
                f"(stride {stride})")
    return (f"{enc.truncated} longer than {limit} tokens, truncated"
            + (f" ({enc.dropped_words} words past the limit predicted O)" if enc.dropped_words else "")
            + "; model.long_text: chunk keeps all of them")
