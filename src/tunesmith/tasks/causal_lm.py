"""Causal language models, supervised fine-tuning: learn to write completions (or a chat's assistant
turns) for prompts; evaluate by loss, perplexity and the exact match / token F1 of greedy generations.

A task module: it provides every name of tasks.base.Task (the generic modules call nothing else). The
loss counts only what the model should write, with the end-of-sequence token appended and learned, so
generations stop (lm_data.py); a batch's examples are packed into rows with per-example attention
(lm_batches.py). What one output is: {"loss_sum", "tokens"} per example, plus "generation" (its text)
when the split is generated on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoModelForCausalLM

from .. import inputs, lm_batches, lm_data
from ..config import Config
from ..errors import TunesmithError
from ..evaluate import generation_metrics
from ..models import from_pretrained, weights_options
from ..runlog import log
from ..schedule import AUTO_MIN_STEPS
from . import text
from .base import IGNORE, Encoded, Splits, resolve_data_config, splits_around, with_data

NAME = "causal_lm"
Examples = lm_data.Examples
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")  # stop tokens of common chat formats
# Not measured here: the rates TRL's and PEFT's LoRA examples use for small decoders (2e-4), and a tenth
# of it for every weight moving (full fine-tuning).
AUTO_LR = {"lora": 2e-4, "full": 2e-5, "freeze": 2e-5, "gradual_unfreeze": 2e-5, "linear_probe": 1e-3}


@dataclass
class LMSpec:
    """What the model does, saved with it (a language model has no classes)."""
    problem_type: str = NAME
    names: list[str] = field(default_factory=list)


@dataclass
class Processor:
    """The tokenizer and what turning text into model inputs needs from the config."""
    tokenizer: object
    model_name: str
    max_length: int                # tokens per example (model.max_length, capped by the model's context)
    packing: bool                  # causal_lm.packing: a batch's examples in one row
    pad_id: int
    stop_ids: list[int]


def labels_from_dict(saved: dict) -> LMSpec:
    return LMSpec(**saved)


# ---------------------------------------------------------------- data

def read_examples(source, cfg: Config, labels: LMSpec | None, require_labels: bool = True) -> Examples:
    return lm_data.read_examples(source, cfg, require_labels)


def load_splits(cfg: Config) -> Splits:
    """Train, validation (a file, or held out of train at random) and test."""
    cfg = with_data(cfg, resolve_data_config(cfg.data))
    data = cfg.data
    train_all = read_examples(data.train, cfg, None)
    return splits_around(train_all, read_examples, cfg, LMSpec())


def has_classes(labels: LMSpec) -> bool:
    return False


def example_classes(targets, labels: LMSpec) -> list[np.ndarray]:
    return [np.zeros(0, np.int64) for _ in range(len(targets))]


def class_ids(name: str, labels: LMSpec) -> list[int]:
    return []


def stratify_by(examples: Examples, labels: LMSpec) -> None:
    return None


def map_words(examples: Examples, fn: Callable) -> Examples:
    raise TunesmithError("augment: word augmentation is not available for task causal_lm (it would change what "
                         "the model learns to write)")


def show_examples(examples: Examples) -> list[str]:
    return [str(x) for x in (examples.prompts or examples.messages or examples.texts)]


# ---------------------------------------------------------------- model

def _processor(tokenizer, model, cfg: Config) -> Processor:
    context = getattr(model.config, "max_position_embeddings", None) or 10**9
    limit = min(text.max_length(tokenizer, cfg), context)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TunesmithError(f"model '{cfg.model.name}': the tokenizer has no end-of-sequence token, so a "
                             "generation could not learn to stop")
    vocab = tokenizer.get_vocab()
    stops = [eos] + [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] != eos]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos  # only ever at masked places
    return Processor(tokenizer, cfg.model.name, limit, cfg.causal_lm.packing, pad, stops)


def build_model(source: str, labels: LMSpec, cfg: Config):
    """The pretrained decoder with its own LM head; returns (model, Processor)."""
    tokenizer = text.load_tokenizer(source, cfg)
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, source, dtype=torch.float32,
                            trust_remote_code=cfg.model.trust_remote_code,
                            **weights_options(source, cfg.model.allow_pickle))
    _attention(model, cfg)
    return model, _processor(tokenizer, model, cfg)


def load_model(folder: str | Path, cfg: Config):
    """A model this task saved (a plain Hugging Face folder), ready for evaluate/predict."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    _attention(model, cfg)
    return model, _processor(text.load_tokenizer(folder, cfg), model, cfg)


def _attention(model, cfg: Config) -> None:
    """Packed rows attend example by example (lm_batches.PACKED_ATTENTION). A model whose code does not
    take transformers' attention functions keeps its own: packed rows then get transformers' mask built
    from the restarting position ids (the same result, with the cost of a mask over the whole row)."""
    if cfg.causal_lm.packing:
        try:
            lm_batches.use_packed_attention(model)
        except (ValueError, AttributeError):
            pass


def save_processor(processor: Processor, folder: Path) -> None:
    processor.tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- features, loss, outputs

def _tokens(tokenizer, piece: str) -> list[int]:
    return tokenizer(piece, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before a text on its own (Llama 2's <s>), for plain texts."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return ids if ids and tokenizer.bos_token_id is not None and ids == [tokenizer.bos_token_id] else []


def encode(processor: Processor, examples: Examples, cfg: Config, train: bool = False, epoch: int = 0) -> Encoded:
    """Token ids and labels per example (IGNORE on context; causal_lm.completion_only_loss: false learns
    every token); an example longer than the limit is cut at its end. Evaluation splits also get the
    prompt for generation (the tokens before the last target piece)."""
    tok, limit = processor.tokenizer, processor.max_length
    eos = tok.eos_token_id
    chat = lm_data.use_chat(examples, tok, cfg, processor.model_name)
    bos = [] if chat else _bos(tok)
    features, truncated, empty = [], 0, 0
    for i in range(len(examples)):
        ids, labels, prompt = list(bos), [IGNORE] * len(bos), None
        for piece, learn in lm_data.segments(examples, i, tok, chat):
            piece_ids = _tokens(tok, piece)
            if learn and (not piece_ids or piece_ids[-1] != eos):
                piece_ids.append(eos)  # learned, so generations stop
            if learn:
                prompt = list(ids)  # what comes before the last target piece
            ids += piece_ids
            learned = learn or not cfg.causal_lm.completion_only_loss
            labels += piece_ids if learned else [IGNORE] * len(piece_ids)
        labels[0] = IGNORE  # nothing predicts an example's first token (nor, packed, the next one's)
        if len(ids) > limit:
            truncated += 1
            ids, labels = ids[:limit], labels[:limit]
        has_target = any(label != IGNORE for label in labels)
        empty += not has_target and (examples.targets is not None or examples.kind == "text")
        feat = {"input_ids": ids}
        if has_target:
            feat["labels"] = labels
        if not train and examples.kind != "text":  # the prompt to generate from: before the reference, or all
            feat["prompt_ids"] = (prompt if examples.targets is not None else ids)[-limit:]
        features.append(feat)
    if train and empty == len(features):
        raise TunesmithError(f"{inputs.shown(examples.table.path)}: no example keeps a token to learn within "
                             f"model.max_length {limit}: raise model.max_length")
    enc = Encoded(features, [len(f["input_ids"]) for f in features], truncated, None, len(features),
                  dropped_words=empty, max_length=limit)
    wants = examples.targets is None or cfg.causal_lm.eval_generate
    if not train and wants and any("prompt_ids" in f for f in features):
        enc.generate = _generator(processor, examples, enc, cfg)
    return enc


def describe_inputs(enc: Encoded, cfg: Config) -> str:
    if not enc.truncated:
        return f"none longer than {enc.max_length} tokens"
    lost = f"; {enc.dropped_words} kept no token to learn" if enc.dropped_words else ""
    return (f"{enc.truncated} longer than {enc.max_length} tokens (model.max_length or the model's context), "
            f"cut there (their completions lose their end){lost}")


def _generator(processor: Processor, examples: Examples, enc: Encoded, cfg: Config) -> Callable:
    """enc.generate: greedy (or causal_lm.temperature) generations for the examples with a prompt."""
    opts = cfg.causal_lm

    def generate(model, outputs: list, batch_size: int, device: torch.device, precision: str) -> list:
        idx = [i for i, f in enumerate(enc.features) if "prompt_ids" in f]
        new = lm_batches.generate(model, [enc.features[i]["prompt_ids"] for i in idx], processor.pad_id,
                                  processor.stop_ids, opts.max_new_tokens, batch_size, device, precision,
                                  opts.temperature, opts.top_p, cfg.train.seed)
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, generated in zip(idx, texts):
            outputs[i] = {**outputs[i], "generation": generated.strip()}
        references = examples.targets
        if references is not None:
            for i in idx[:opts.samples]:
                log(f"sample: {_short(show_examples(examples)[i])!r} -> {_short(outputs[i]['generation'])!r} "
                    f"(reference {_short(references[i])!r})")
        return outputs
    return generate


def _short(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit - 3] + "..."


def make_collate(processor: Processor, multiple: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The batch in one packed row (causal_lm.packing) or rows padded to the longest example; widths rounded
    up to `multiple`."""
    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        return lm_batches.collate(features, processor.pad_id, processor.packing, multiple)
    return collate


def forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    return lm_batches.forward(model, batch)


def auto_lr(strategy: str, batch_size: int) -> float:
    return AUTO_LR[strategy]


def auto_min_steps() -> int:
    return AUTO_MIN_STEPS


def cpu_bf16_needs_amx() -> bool:
    return False


def extra_loss_weights(cfg: Config, labels: LMSpec) -> None:
    return None


def split_outputs(stats: np.ndarray, features: list[dict]) -> list[dict]:
    return [{"loss_sum": float(row[0]), "tokens": int(row[1])} for row in stats]


def merge_windows(outputs: list, enc: Encoded, aggregation: str = "mean") -> list:
    return outputs  # one input per example


def window_targets(outputs, enc: Encoded) -> list:
    # config refuses distill.teacher for this task; this is the interface's answer should anything ask
    raise TunesmithError("distill.teacher: not for causal_lm (it distills classification tasks)")


# ---------------------------------------------------------------- metrics and predictions

def default_metric(labels: LMSpec) -> str:
    return "loss"


def metric_names(labels: LMSpec) -> list[str]:
    return ["loss", "perplexity", "exact_match", "token_f1"]


def compute_metrics(outputs: list[dict], targets: list[str] | None, labels: LMSpec) -> dict:
    """Loss per target token and its perplexity; with references and generations, exact match and token
    F1 (SQuAD normalisation), and a few samples."""
    tokens = sum(o["tokens"] for o in outputs)
    out: dict = {}
    if tokens:
        out["loss"] = sum(o["loss_sum"] for o in outputs) / tokens
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
        out["target_tokens"] = tokens
    generated = [o.get("generation") for o in outputs]
    if targets is not None and all(g is not None for g in generated):
        out.update(generation_metrics(generated, targets))
        out["samples"] = [{"generation": g, "reference": r} for g, r in zip(generated[:5], targets[:5])]
    return out


def degenerate_predictions(metrics: dict, labels: LMSpec) -> None:
    return None


def predictions_frame(examples: Examples, outputs: list[dict], labels: LMSpec) -> pd.DataFrame:
    """The input rows plus the generation (and, with a completion, the example's loss per target token)."""
    df = examples.table.df.copy()
    df["generation"] = [o.get("generation") for o in outputs]
    if any(o["tokens"] for o in outputs):
        df["loss"] = [round(o["loss_sum"] / o["tokens"], 6) if o["tokens"] else None for o in outputs]
    return df
