"""Continued pre-training on raw text (task: language_modeling): masked-LM (mlm) for BERT-style encoders,
next-token prediction (clm) for decoders.

Texts (a column of a table, or a .txt file with one text per line) are tokenized without special tokens,
joined by a separator ([SEP] for mlm, the end-of-text token for clm) and cut into blocks of
model.max_length tokens, each wrapped in the model's own special tokens ([CLS] ... [SEP] for BERT).
mlm masks 15% of every training block anew for each batch (dynamic masking, as RoBERTa), drawing from
torch's global generator, which checkpoints save and restore: a resumed run masks exactly as the
uninterrupted one. Validation and test blocks are masked once with a fixed seed, so their loss is
comparable between evaluations, seeds and runs.

One output per block: [sum of its token losses, tokens predicted]; metrics: loss per predicted token
and perplexity. model/ is a plain Hugging Face masked- or causal-LM folder; an encoder's model/ is a valid
model.name for text or token classification (the pooler that BERT's masked-LM class drops is kept for it).

A task module: it provides every name of tasks.base.Task.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedModel
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)

from .. import inputs
from ..config import Config
from ..data import Table, read_table, read_text_lines, text_values
from ..errors import TunesmithError
from ..models import from_pretrained, resolve_model, weights_options
from ..runlog import log, warn
from ..schedule import AUTO_MIN_STEPS
from . import text
from .base import IGNORE, Encoded, Splits, resolve_data_config, row_outputs, splits_around, with_data

NAME = "language_modeling"
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the tokens chosen for mlm: [MASK], a random token, the rest unchanged
EVAL_MASK_SEED = 0  # validation/test masks: fixed, so losses compare across evaluations, seeds and runs


@dataclass
class Objective:
    """What the model learns (the 'labels' of this task), saved with the model."""
    objective: str  # "mlm" | "clm"


@dataclass
class Examples:
    table: Table
    texts: list[str]
    groups: list[str] | None = None
    targets: None = None  # raw text has no labels

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray) -> "Examples":
        pick = lambda xs: [xs[i] for i in idx] if xs is not None else None  # noqa: E731
        table = Table(self.table.df.iloc[idx].reset_index(drop=True), self.table.path,
                      pick(self.table.line_of_row), pick(self.table.row_names))
        return Examples(table, pick(self.texts), pick(self.groups))


@dataclass
class Processor:
    """The tokenizer plus what the collate function needs to know."""
    tokenizer: Any
    objective: str
    mlm_probability: float


# ---------------------------------------------------------------- data

def read_examples(source, cfg: Config, labels: Objective | None, require_labels: bool = True) -> Examples:
    """Texts of data.text_column (CSV/TSV/JSONL/Parquet, in-memory data), or of a .txt file (one per line)."""
    if inputs.is_text_list(source):
        with inputs.in_memory_input(list(source), "texts", cfg.data.text_column) as token:
            return read_examples(token, cfg, labels, require_labels)
    column = cfg.data.text_column
    is_txt = not inputs.is_token(source) and Path(str(source)).suffix.lower() == ".txt"
    table = read_text_lines(source, column) if is_txt else read_table(source)
    groups = None
    if cfg.data.group_column and cfg.data.group_column in table.df.columns:
        groups = [str(g) for g in table.df[cfg.data.group_column].tolist()]
    return Examples(table, text_values(table, column), groups)


def load_splits(cfg: Config) -> Splits:
    """Train, validation (a file, or data.validation_fraction of the training texts, whole groups with
    data.group_column) and test; the objective comes from the model (checked before any text is read)."""
    cfg = with_data(cfg, resolve_data_config(cfg.data))
    objective = Objective(resolve_objective(cfg, _model_config(resolve_model(cfg.model.name), cfg)))
    data = cfg.data
    train_all = read_examples(data.train, cfg, None)
    return splits_around(train_all, read_examples, cfg, objective)


def labels_from_dict(saved: dict) -> Objective:
    return Objective(**saved)


def has_classes(labels: Objective) -> bool:
    return False


def example_classes(targets, labels: Objective) -> list[np.ndarray]:
    return []


def class_ids(name: str, labels: Objective) -> list[int]:
    return []


def stratify_by(examples: Examples, labels: Objective) -> np.ndarray | None:
    return None


def map_words(examples: Examples, fn: Callable) -> Examples:
    words = [t.split() for t in examples.texts]
    new, _ = fn(words, None)
    return dataclasses.replace(examples, texts=[t if w == n else " ".join(n) for t, w, n in zip(examples.texts, words, new)])


def show_examples(examples: Examples) -> list[str]:
    return list(examples.texts)


# ---------------------------------------------------------------- model

def _model_config(source: str, cfg: Config):
    return from_pretrained(AutoConfig.from_pretrained, source, trust_remote_code=cfg.model.trust_remote_code)


def resolve_objective(cfg: Config, config) -> str:
    """language_modeling.objective for this model: auto -> mlm where transformers has a masked-LM class
    for the architecture, else clm; a choice the architecture cannot learn is one error line."""
    setting, kind, name = cfg.language_modeling.objective, config.model_type, cfg.model.name
    masked, causal = kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES, kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False):
        raise TunesmithError(f"model '{name}' ({kind}) is an encoder-decoder model; task language_modeling "
                             "trains encoders (mlm) or decoders (clm)")
    if setting == "mlm" and not masked:
        raise TunesmithError(f"model '{name}' ({kind}) has no masked-LM form in transformers, so objective mlm "
                             "is not possible; use language_modeling.objective: clm for a decoder")
    # an encoder attends both ways: trained on the next token it would read the token it predicts
    if setting == "clm" and (masked and not getattr(config, "is_decoder", False) or not causal):
        raise TunesmithError(f"model '{name}' ({kind}) is not a left-to-right decoder, so objective clm is not "
                             "possible (each token would see the one it predicts); use language_modeling.objective: mlm")
    if setting != "auto":
        return setting
    if not (masked or causal):
        raise TunesmithError(f"model '{name}' ({kind}) has no masked-LM or causal-LM form in transformers")
    return "mlm" if masked else "clm"


def build_model(source: str, labels: Objective, cfg: Config):
    """The backbone with its language-model head; a head the folder lacks is made new (MiniLM and MPNet
    ship the encoder only: the MLM head's transform starts random, its decoder is tied to the word
    embeddings). Returns (model, Processor)."""
    tokenizer = text.load_tokenizer(source, cfg)
    if labels.objective == "mlm" and tokenizer.mask_token_id is None:
        raise TunesmithError(f"model '{cfg.model.name}': its tokenizer has no mask token, which objective mlm needs")
    model_class = AutoModelForMaskedLM if labels.objective == "mlm" else AutoModelForCausalLM
    model, info = from_pretrained(model_class.from_pretrained, source, output_loading_info=True,
                                  trust_remote_code=cfg.model.trust_remote_code,
                                  **weights_options(source, cfg.model.allow_pickle))
    missing = sorted(info["missing_keys"])
    prefix = model.base_model_prefix + "."
    backbone = [k for k in missing if k.startswith(prefix)]
    if backbone:
        warn(f"model '{cfg.model.name}': {len(backbone)} backbone tensor(s) are not in the folder and start random "
             f"({', '.join(backbone[:3])}{' ...' if len(backbone) > 3 else ''})")
    if len(missing) > len(backbone):
        log(f"model '{cfg.model.name}' has no {labels.objective} head: a new one is initialised "
            f"({len(missing) - len(backbone)} tensors; the output layer is tied to the word embeddings)")
    keep_pooler(model, source)
    return model, Processor(tokenizer, labels.objective, cfg.language_modeling.mlm_probability)


def keep_pooler(model: torch.nn.Module, source: str) -> None:
    """Put back the pooler (dense + tanh over [CLS]) that BERT-style masked-LM classes leave out, when the
    model folder has one: it is not trained here (no gradient reaches it) and is saved unchanged, so a
    classifier later fine-tuned from model/ starts from the backbone's own pooler, not a random one."""
    base = model.base_model
    if getattr(base, "pooler", "absent") is not None or not Path(source).is_dir():
        return
    weights = {}
    from safetensors import safe_open
    for file in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if "pooler." in key:
                    weights[key[key.index("pooler.") + len("pooler."):]] = f.get_tensor(key)
    if not weights:
        return
    try:
        pooler = type(base)(model.config, add_pooling_layer=True).pooler
    except TypeError:  # an architecture without that option
        return
    pooler.load_state_dict(weights)
    base.pooler = pooler.to(next(model.parameters()).dtype)


def load_model(folder: str | Path, cfg: Config):
    """A model this task saved (a plain Hugging Face folder), ready for evaluate/predict."""
    objective = Objective(resolve_objective(cfg, _model_config(str(folder), cfg)))
    model_class = AutoModelForMaskedLM if objective.objective == "mlm" else AutoModelForCausalLM
    model = model_class.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    keep_pooler(model, str(folder))
    return model, Processor(text.load_tokenizer(folder, cfg), objective.objective,
                            cfg.language_modeling.mlm_probability)


def save_processor(processor: Processor, folder: Path) -> None:
    processor.tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- features: packing and masking

def _special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text ([CLS] / [SEP] for BERT, <s> for
    Llama, none for GPT-2), found by tokenizing one word with and without them."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def pack(tokenizer, texts: list[str], block: int, objective: str) -> list[list[int]]:
    """Texts joined by a separator and cut into blocks of `block` tokens (special tokens included); the
    last block may be shorter."""
    before, after = _special_wrapping(tokenizer)
    body = block - len(before) - len(after)
    if body < 1:
        raise TunesmithError(f"model.max_length {block} leaves no room for text between the special tokens")
    sep = tokenizer.sep_token_id if objective == "mlm" else tokenizer.eos_token_id
    if sep is None:
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
    if before + after and stream and stream[-1] == sep:  # the wrapping ends the last block already
        stream.pop()
    return [before + stream[i:i + body] + after for i in range(0, len(stream), body)]


def mask_tokens(ids: torch.Tensor, maskable: torch.Tensor, mask_id: int, vocab_size: int, probability: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: each maskable token is chosen with `probability`; a chosen one becomes mask_id
    (80%), a random token (10%) or stays as it is (10%). Returns (inputs, targets): targets hold the
    original id where chosen, IGNORE elsewhere. Special and padding tokens must be left out of `maskable`."""
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & maskable
    roll = torch.rand(ids.shape, generator=generator)
    randoms = torch.randint(vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll < MASK_SHARE), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (roll >= MASK_SHARE) & (roll < MASK_SHARE + RANDOM_SHARE), randoms, inputs)
    return inputs, torch.where(chosen, ids, torch.full_like(ids, IGNORE))


def _maskable(processor: Processor, ids: torch.Tensor) -> torch.Tensor:
    return ~torch.isin(ids, torch.as_tensor(sorted(set(processor.tokenizer.all_special_ids)), dtype=ids.dtype))


def encode(processor: Processor, examples: Examples, cfg: Config, train: bool = False, epoch: int = 0) -> Encoded:
    """Blocks of packed text. mlm: training blocks are masked later, per batch (make_collate); other
    blocks are masked here, once, with a fixed seed."""
    tokenizer, objective = processor.tokenizer, processor.objective
    block = text.max_length(tokenizer, cfg)
    blocks = pack(tokenizer, examples.texts, block, objective)
    if not blocks:
        raise TunesmithError(f"{examples.table.path}: the texts give no tokens")
    features: list[dict] = [{"input_ids": ids} for ids in blocks]
    if objective == "mlm" and not train:
        generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
        for f in features:
            ids = torch.as_tensor(f["input_ids"])
            masked, targets = mask_tokens(ids, _maskable(processor, ids), tokenizer.mask_token_id, len(tokenizer),
                                          processor.mlm_probability, generator)
            f["input_ids"], f["targets"] = masked.tolist(), targets.tolist()
    return Encoded(features, [len(b) for b in blocks], 0, None, len(examples.texts), max_length=block,
                   inputs_vary=objective == "mlm" and train)


def describe_inputs(enc: Encoded, cfg: Config) -> str:
    return f"{sum(enc.lengths)} tokens packed into {len(enc.features)} blocks of up to {enc.max_length}"


def make_collate(processor: Processor, multiple: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Pad the blocks and add `targets`: the token each position predicts (IGNORE: none). mlm: the
    masked tokens (training blocks masked here, anew for every batch); clm: the next token."""
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = text.pad_batch(features, pad_id, multiple)
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        if processor.objective == "clm":  # position i predicts token i + 1; padding predicts nothing
            targets = torch.full_like(ids, IGNORE)
            targets[:, :-1] = torch.where(real[:, 1:], ids[:, 1:], IGNORE)
        elif "targets" in features[0]:  # masked once by encode
            targets = torch.full_like(ids, IGNORE)
            for i, f in enumerate(features):
                targets[i, :len(f["targets"])] = torch.as_tensor(f["targets"])
        else:
            batch["input_ids"], targets = mask_tokens(ids, real & _maskable(processor, ids), tokenizer.mask_token_id,
                                                      len(tokenizer), processor.mlm_probability)
        batch["targets"] = targets
        return batch
    return collate


# ---------------------------------------------------------------- loss and outputs

def _lm_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that turns the base model's hidden states into token logits, when it is the one module
    beside the base model (BERT cls, MPNet/RoBERTa lm_head, GPT-2/Llama lm_head); else None."""
    if not isinstance(model, PreTrainedModel) or model.base_model is model:
        return None
    others = [m for m in model.children() if m is not model.base_model]
    return others[0] if len(others) == 1 else None


def forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(per block [sum of token losses, tokens predicted], mean loss per predicted token).

    The head runs only at the positions that predict something: for mlm that is 15% of the tokens, and
    the head (a vocabulary-wide output layer: 384 x 30,522 for MiniLM) costs about as much per token as
    the whole 6-block encoder, so this nearly halves the work."""
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    targets = batch["targets"]
    where = targets != IGNORE
    head = _lm_head(model)
    if head is None:
        logits = model(**inputs).logits[where]
    else:
        logits = head(model.base_model(**inputs)[0][where])
    losses = F.cross_entropy(logits.float(), targets[where], reduction="none")
    rows = torch.zeros(len(targets), device=losses.device).index_add_(0, where.nonzero()[:, 0], losses.detach())
    outputs = torch.stack([rows, where.sum(dim=1).float()], dim=1)
    return outputs, losses.mean() if len(losses) else logits.sum() * 0.0


def extra_loss_weights(cfg: Config, labels: Objective) -> np.ndarray | None:
    return None


def auto_lr(strategy: str, batch_size: int) -> float:
    return text.auto_lr(strategy, batch_size)  # the text encoders' rates (not tuned for language modelling)


def auto_min_steps() -> int:
    return AUTO_MIN_STEPS


def cpu_bf16_needs_amx() -> bool:
    return False


def split_outputs(logits: np.ndarray, features: list[dict]) -> list:
    return row_outputs(logits, features)


def merge_windows(outputs: list, enc: Encoded, aggregation: str = "mean") -> np.ndarray:
    return np.asarray(outputs, dtype=np.float64).reshape(-1, 2)


def window_targets(outputs, enc: Encoded) -> list:
    # config refuses distill.teacher for this task; this is the interface's answer should anything ask
    raise TunesmithError("distill.teacher: not for language_modeling (it distills classification tasks)")


# ---------------------------------------------------------------- metrics and predictions

def default_metric(labels: Objective) -> str:
    return "loss"


def metric_names(labels: Objective) -> list[str]:
    return ["loss", "perplexity"]


def compute_metrics(outputs: np.ndarray, targets, labels: Objective) -> dict:
    """Loss per predicted token over all blocks, and perplexity = exp(loss)."""
    total, tokens = np.asarray(outputs, dtype=np.float64).reshape(-1, 2).sum(axis=0)
    loss = float(total / tokens) if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "predicted_tokens": int(tokens)}


def degenerate_predictions(metrics: dict, labels: Objective) -> str | None:
    return None


def predictions_frame(examples: Examples, outputs: np.ndarray, labels: Objective) -> pd.DataFrame:
    """One row per block (texts are packed, so a block is the unit): tokens predicted, loss, perplexity."""
    outputs = np.asarray(outputs, dtype=np.float64).reshape(-1, 2)
    loss = np.divide(outputs[:, 0], outputs[:, 1], out=np.full(len(outputs), np.nan), where=outputs[:, 1] > 0)
    return pd.DataFrame({"block": np.arange(len(outputs)), "predicted_tokens": outputs[:, 1].astype(int),
                         "loss": np.round(loss, 6), "perplexity": np.round(np.exp(np.minimum(loss, 700.0)), 4)})
