"""Typed configuration: the only place where defaults live.

A config is one YAML file; any key can be overridden with a dotted path
(`--train.lr 3e-5` on the command line, `{"train.lr": 3e-5}` from Python).
Every mistake is reported as one line naming the file, the key and, where known, the line; a bad
override names the override instead (`command line --train.lr abc: ...`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from .errors import TunesmithError, not_found


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("minilm-l6", description="catalog short name, local Hugging Face folder, or hub id")
    max_length: int = Field(128, ge=8, le=8192, description="tokens per model input; see long_text for longer texts")
    long_text: Literal["truncate", "chunk"] = Field(
        "truncate", description="texts longer than max_length: truncate = keep the start; chunk = split into "
                                "overlapping windows (training and prediction) and combine them per document")
    stride: int = Field(32, ge=0, description="chunk: tokens shared by consecutive windows")
    chunk_aggregation: Literal["mean", "max"] = Field(
        "mean", description="chunk, classification: combine the windows' logits of a document by mean or max "
                            "(NER takes each word from the window where it has the most context)")
    trust_remote_code: bool = Field(False, description="run model code from the model folder (only if you trust it)")
    allow_pickle: bool = Field(
        False, description="load a model folder's pickled weights (pytorch_model.bin) when it has no safetensors "
                           "(only if you trust the file: unpickling can run code)")

    @field_validator("stride")
    @classmethod
    def _stride_fits(cls, stride: int, info: ValidationInfo) -> int:
        max_length = info.data.get("max_length")
        if info.data.get("long_text") == "chunk" and max_length and stride > max_length // 2:
            raise ValueError(f"{stride} is too large for max_length {max_length}: windows must move forward "
                             f"(use at most {max_length // 2})")
        return stride

    @property
    def chunk_stride(self) -> int | None:
        """The window overlap when long texts are chunked; None when they are truncated."""
        return self.stride if self.long_text == "chunk" else None


AUTO_VALIDATION_FRACTION, AUTO_VALIDATION_ROWS = 0.1, 500  # data.validation_fraction: auto


class DataConfig(_Section):
    dataset: str | None = Field(None, description="catalog dataset short name (instead of train/test files)")
    train: str | None = Field(None, description="training data: a .csv, .tsv, .jsonl or .parquet file (a folder of "
                                                "class folders for images, CoNLL for NER)")
    validation: str | Literal[False] | None = Field(
        None, description="validation data; absent: a catalog dataset's own validation split, else carved out of "
                          "train (data.validation_fraction); false: no validation split at all (the last model "
                          "is kept, as with validation_fraction 0)")
    test: str | Literal[False] | None = Field(
        None, description="test data, evaluated once with the best model; absent: a catalog dataset's own test "
                          "split, if any; false: no test split at all")
    text_column: str = Field("text", description="the text of each row (token classification: raw text to predict)")
    label_column: str = "label"
    group_column: str | None = Field(
        None, description="rows sharing a group (e.g. a film) stay on one side of the validation split")
    problem_type: Literal["single_label", "multi_label", "regression"] = Field(
        "single_label", description="text and image classification: one class per row, several, or a number")
    label_separator: str = Field("|", description="separates labels of a multi-label row in CSV/TSV")
    validation_fraction: float | Literal["auto"] = Field(
        "auto", description="share of train held out for validation when no file is given; auto: 10%, at most "
                            f"{AUTO_VALIDATION_ROWS} rows (docs/defaults.md)")
    unlabeled: str | None = Field(
        None, description="extra inputs without labels (texts, sentences or images, read like train) that "
                          "distill.teacher labels: the student learns them from the teacher's soft targets only")

    @field_validator("validation", "test", mode="before")
    @classmethod
    def _split_is_a_path_or_false(cls, value, info):
        # checked before the union: pydantic would read 0 as false, and its message spells false as False
        if value is None or value is False or isinstance(value, str):
            return value
        raise ValueError(f"expected a file path, or false for no {info.field_name} split")  # the message adds (got ...)

    @field_validator("validation_fraction")
    @classmethod
    def _fraction_in_range(cls, value):
        if value != "auto" and not 0.0 <= value < 1.0:
            raise ValueError("expected auto or a share from 0 to below 1")  # the message adds (got ...)
        return value

    @property
    def holds_out(self) -> bool:
        """Is a validation split carved out of train (when no validation file is given)?"""
        return self.validation is not False and (self.validation_fraction == "auto" or self.validation_fraction > 0)

    def validation_share(self, n: int) -> float:
        """The share of n training rows to hold out: the set fraction, or for auto 10% and at most
        AUTO_VALIDATION_ROWS rows (on 10,000 reviews, 5% held out instead of 10% gave 0.822 +- 0.000 against
        0.818 +- 0.005, 2 seeds: a checkpoint is chosen as well on 500 rows, and the rest train)."""
        if self.validation_fraction != "auto":
            return self.validation_fraction
        return min(AUTO_VALIDATION_FRACTION, AUTO_VALIDATION_ROWS / max(1, n))

    @model_validator(mode="after")
    def _needs_some_data(self) -> "DataConfig":
        if self.dataset is None and self.train is None:
            raise ValueError("set data.dataset (a catalog name) or data.train (a file)")
        return self


class TextClassificationConfig(_Section):
    """task: text_classification (its own options; the rest is in data, model, train...)."""
    text_pair_column: str | None = Field(None, description="second text for pair tasks (e.g. NLI)")


class TokenClassificationConfig(_Section):
    """task: token_classification (named entities: one tag per word)."""
    format: Literal["auto", "conll", "jsonl"] = Field(
        "auto", description="conll = one 'token ... tag' line per token (tab- or space-separated, tag last), blank "
                            "line between sentences; jsonl = records with tokens + tags lists (.csv/.parquet too); "
                            "auto: by file suffix")
    tokens_column: str = Field("tokens", description="list of tokens in a jsonl record")
    tags_column: str = Field("tags", description="list of tags in a jsonl record")
    tag_scheme: Literal["auto", "IO", "BIO", "IOB1", "BIOES"] = Field(
        "auto", description="how tags mark entities (BIO = IOB2); auto: detected from train")
    repair_tags: bool = Field(
        False, description="read tags that break the scheme (I- after O) as entity starts instead of stopping "
                           "with an error")
    label_all_subtokens: bool = Field(False, description="train on every sub-token of a word, not only the first")
    o_tag_weight: float = Field(
        1.0, gt=0, description="loss weight of tokens tagged O (< 1 counters the dominant O tag; entity tags weigh 1)")


class ImageClassificationConfig(_Section):
    """task: image_classification."""
    image_column: str = Field("image", description="a table's column of image paths (relative to the table's "
                                                   "folder); a folder of class folders needs none")
    image_size: int | Literal["auto"] = Field(
        "auto", description="side of the square input the model sees (auto: the pretrained model's own, e.g. 224)")
    pretrained: bool = Field(
        True, description="start from pretrained weights (catalog folders, model.weights, or the hub when online); "
                          "false: random initial weights")
    weights: str | None = Field(
        None, description="a local weights file (.safetensors, or a .pth/.bin state dict read with "
                          "weights_only) for a timm or torchvision architecture named by model.name")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy against smoothed targets")
    decoded_cache_mb: int = Field(
        2048, ge=0, description="decoded images (uint8, at the model's resize size) larger than this are kept in a "
                                "memory-mapped file in the run folder instead of memory")


class LanguageModelingConfig(_Section):
    """task: language_modeling (continued pre-training on raw text: data.text_column of a table, or a .txt
    file with one text per line; the texts are packed into blocks of model.max_length tokens)."""
    objective: Literal["auto", "mlm", "clm"] = Field(
        "auto", description="mlm: masked-LM (BERT-style encoders; a fresh MLM head where the model folder has "
                            "none); clm: next-token prediction (GPT/Llama-style decoders); auto: mlm for models "
                            "transformers has a masked-LM class for, else clm")
    mlm_probability: float = Field(
        0.15, gt=0, lt=1, description="mlm: share of tokens to predict; of those 80% become [MASK], 10% a random "
                                      "token, 10% stay as they are (BERT's recipe)")


class CausalLMConfig(_Section):
    """task: causal_lm (supervised fine-tuning of a decoder: prompt -> completion, or chats)."""
    prompt_column: str = Field("prompt", description="the prompt of a prompt/completion row")
    completion_column: str = Field("completion", description="what the model should learn to write (the reference "
                                                              "for exact match / token F1 at evaluation)")
    messages_column: str = Field("messages", description="chat records: a list of {role, content} turns, rendered "
                                                         "with the model's chat template; the assistant turns learn")
    format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="prompt/completion rows: chat = a user turn and an assistant turn in the model's chat "
                            "template; plain = prompt text then completion text; auto: chat when the tokenizer has "
                            "a chat template")
    completion_only_loss: bool = Field(
        True, description="loss only on the completion / assistant tokens (and the end-of-sequence token "
                          "appended to them); false: on every token")
    packing: bool = Field(
        True, description="pack a batch's examples into rows of model.max_length tokens, each example attending "
                          "only to itself (positions restart): no compute on padding")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="evaluation and predict: tokens generated at most")
    temperature: float = Field(0.0, ge=0, description="predict: 0 = greedy; above 0 samples at this temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="predict when sampling: nucleus sampling mass")
    eval_generate: bool = Field(
        True, description="greedy generations at every validation and on the test split, scored by exact match "
                          "and token F1 against the completions (costs a generation pass)")
    samples: int = Field(3, ge=0, description="sample generations shown in the run log at each evaluation")


# keys that moved from data to a task's own section: an old config gets a message naming the new key
MOVED_KEYS = {f"data.{k}": f"token_classification.{k}" for k in TokenClassificationConfig.model_fields}
MOVED_KEYS["data.text_pair_column"] = "text_classification.text_pair_column"


def parse_duration(value: Any) -> float | None:
    """'90s', '20m', '1h', '1h30m', '1.5h' or a number of seconds -> seconds."""
    if value is None or isinstance(value, bool):
        return None if value is None else _bad_duration(value)
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else _bad_duration(value)
    text = str(value).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return _bad_duration(value)
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    return seconds if seconds > 0 else _bad_duration(value)


def _bad_duration(value: Any) -> float:
    raise ValueError("expected a duration such as 90s, 20m, 1h or 1h30m")


class TrainConfig(_Section):
    epochs: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="passes over the training data (may be fractional, e.g. 0.5); auto: enough "
                            "optimizer steps to learn small data (at least 300, NER 600), one and a half passes "
                            "over large data, evaluated several times with early stopping (see docs/defaults.md)")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="examples per optimizer step (before grad_accum_steps); auto: 16 for small data "
                            "(fewer than 4,800 training inputs: more updates per pass, half the compute of 32 "
                            "for the same steps), else 32")
    eval_batch_size: int = Field(128, ge=1)
    lr: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        "auto", description="peak learning rate; auto: the rate measured to work for the task and strategy "
                            "(text: full, freeze, gradual_unfreeze 5e-5, at batch 32+ 1e-4, lora 5e-4, linear_probe 2e-3; NER: "
                            "full, freeze, gradual_unfreeze 1e-4; images: 1e-3, lora 2e-3, linear_probe 1e-2)")
    weight_decay: float = Field(0.01, ge=0)
    dropout: Annotated[float, Field(ge=0, lt=1)] | Literal["auto", "model"] = Field(
        "auto", description="drop probability of every dropout layer of the model while training (the saved model "
                            "keeps its own); model: the model's own; auto: none when the plan makes at most 1.5 passes "
                            "over the training data (large data with epochs: auto), where it only slowed learning "
                            "(docs/defaults.md), else the model's own")
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, description="clip gradients to this norm; null turns it off")
    grad_accum_steps: int = Field(1, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where it is faster (CPUs with AMX/AVX512-BF16, for image "
                            "models only AMX; GPUs for models of 150M+ parameters, smaller ones measured "
                            "faster in fp32), else fp32")
    seed: int = 0
    fast_dropout: bool | Literal["auto"] = Field(
        "auto", description="draw dropout masks 16 random bits per element instead of torch's Bernoulli generator "
                            "(same probability and scaling, another random stream; 1.13x per bf16 step on a CPU); "
                            "auto: on CPUs, where torch's masks are slow")
    group_by_length: bool | Literal["auto"] = Field(
        "auto", description="batch texts of similar length to cut padding; auto: yes, except for causal_lm with "
                            "packing (a batch is one packed row, no padding to cut; batches of similar length "
                            "reached a higher validation loss in the same steps: bench/README.md)")
    pad_to_multiple_of: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="round each batch's width up to a multiple of this; auto: 16 on a GPU (a few fixed "
                            "shapes that its kernels handle fast), 1 on a CPU (there every padded token costs time)")
    eval_every_steps: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="evaluate every N optimizer steps; null: at the end of every epoch; auto: every "
                            "epoch when epochs is a number, else several times per run (evaluation kept to "
                            "about a tenth of the training time)")
    metric: str = Field("auto", description="metric that picks the best checkpoint (auto: macro_f1 / r2)")
    early_stopping_patience: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        "auto", description="stop after this many evaluations without improvement; auto: 3 when epochs is "
                            "auto (never in the first half of the plan), else off; null: off")
    time_limit: Annotated[float, BeforeValidator(parse_duration)] | None = Field(
        None, description="budget for the whole run, e.g. 20m or 1h: the plan is cut to what fits at the "
                          "speed measured on the first steps, and training stops at the budget with the best "
                          "model so far")
    checkpoint_every_steps: int = Field(200, ge=1, description="resumable checkpoint interval (optimizer steps)")
    keep_checkpoints: bool = Field(
        False, description="keep the resumable checkpoints (model + optimizer state) after a run finishes; "
                           "model/ and the logs are always kept")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    refit: bool = Field(
        False, description="once the validation split has shown the plan learns, train again from the pretrained "
                           "model on train + validation (the rows data.validation_fraction held out) for the same "
                           "steps and keep that last model (not with a time limit). Measured on small data it "
                           "helped two sets and hurt one (docs/defaults.md), hence off by default")


class LoraSettings(_Section):
    r: int = Field(8, ge=1, description="rank of the low-rank update")
    alpha: float = Field(16, gt=0, description="scaling: the update is multiplied by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(
        None, description="module names to adapt; null: peft's default for the architecture "
                          "(BERT/RoBERTa: query, value; DistilBERT: q_lin, v_lin; MPNet: q, v); language models "
                          "(causal_lm): every linear layer of the blocks")
    save: Literal["merged", "adapter"] = Field(
        "merged", description="merged: model/ is a plain Hugging Face folder; adapter: only the adapter and head")


class StrategyConfig(_Section):
    """Which parameters learn, at what learning rate, and when (see strategies.py)."""
    name: Literal["full", "freeze", "linear_probe", "gradual_unfreeze", "lora"] = Field(
        "full", description="full: everything learns; freeze: embeddings and/or bottom blocks stay fixed; "
                            "linear_probe: only the head learns; gradual_unfreeze: head first, then one more "
                            "block from the top at a time; lora: low-rank adapters plus the head (task causal_lm: "
                            "lora by default, adapters on every linear layer of the blocks, the LM head frozen)")
    freeze_embeddings: bool = Field(
        True, description="freeze: also freeze the embeddings; gradual_unfreeze: never unfreeze them "
                          "(false: they unfreeze last, after the bottom block)")
    freeze_layers: int | float = Field(
        0, description="freeze: blocks frozen from the bottom; a fraction (0.5) means that share of the blocks; "
                       "negative counts from the top (-2: all but the top two)")
    unfreeze_every_epochs: float | None = Field(
        None, gt=0, description="gradual_unfreeze: unfreeze one more layer every this many epochs "
                                "(neither this nor unfreeze_every_steps set: every 1 epoch)")
    unfreeze_every_steps: int | None = Field(
        None, ge=1, description="gradual_unfreeze: unfreeze one more layer every this many optimizer steps")
    layerwise_lr_decay: float = Field(
        1.0, gt=0, le=1, description="discriminative LR: the head gets train.lr, each block down gets "
                                     "lr x decay more (the embeddings are one level below the bottom block)")
    lora: LoraSettings = LoraSettings()
    cache_features: Literal["auto", "off"] = Field(
        "auto", description="auto: when the bottom blocks are frozen, compute their outputs once and train the "
                            "top from the cache (same results, much faster epochs)")
    @field_validator("cache_features", mode="before")
    @classmethod
    def _yaml_boolean(cls, value: Any) -> Any:
        # YAML reads an unquoted `off` (as the docs write it) as false, and `on` as true
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    cache_memory_mb: int = Field(
        2048, ge=0, description="cached features larger than this go to a memory-mapped file in the run folder")

    DEFAULT_UNFREEZE_EVERY_EPOCHS: ClassVar[float] = 1.0

    @model_validator(mode="after")
    def _settings_fit_the_strategy(self) -> "StrategyConfig":
        # compare with the defaults, not model_fields_set: a saved config.yaml spells out every key
        given = {k for k, f in type(self).model_fields.items() if getattr(self, k) != f.get_default(call_default_factory=True)}
        only_for = {"freeze_layers": ("freeze",), "freeze_embeddings": ("freeze", "gradual_unfreeze"),
                    "unfreeze_every_epochs": ("gradual_unfreeze",), "unfreeze_every_steps": ("gradual_unfreeze",),
                    "lora": ("lora",)}
        for key, names in only_for.items():
            if key in given and self.name not in names:
                raise ValueError(f"'{key}' applies to strategy {' or '.join(names)}, not '{self.name}'")
        if self.layerwise_lr_decay != 1.0 and self.name not in ("full", "freeze", "gradual_unfreeze"):
            raise ValueError(f"layerwise_lr_decay works with full, freeze and gradual_unfreeze, not '{self.name}'")
        n = self.freeze_layers
        if isinstance(n, float) and not n.is_integer() and not -1 < n < 1:
            raise ValueError(f"freeze_layers must be a whole number of blocks or a fraction between -1 and 1 (got {n})")
        if self.name == "freeze" and not self.freeze_embeddings and n == 0:
            raise ValueError("strategy 'freeze' freezes nothing: set freeze_layers or freeze_embeddings: true")
        if self.unfreeze_every_epochs is not None and self.unfreeze_every_steps is not None:
            raise ValueError("set unfreeze_every_epochs or unfreeze_every_steps, not both")
        return self


class ImbalanceConfig(_Section):
    """How training counters classes of very different sizes (see imbalance.py)."""
    method: Literal["none", "class_weights", "oversample", "focal"] = Field(
        "none", description="class_weights: weight each class's loss; oversample: draw rare-class examples more "
                            "often (a weighted sampler, same epoch size); focal: focal loss, which down-weights "
                            "examples the model already gets right")
    weights: Literal["balanced"] | dict[str, float] = Field(
        "balanced", description="class_weights / oversample: 'balanced' (n / (classes x count), from the training "
                                "split; multi-label: negatives / positives per class) or a weight per class name "
                                "(token classification: per entity type, and 'O')")
    gamma: float = Field(2.0, ge=0, description="focal: how strongly easy examples are down-weighted (0: plain "
                                                "cross-entropy)")

    @field_validator("weights")
    @classmethod
    def _positive(cls, weights: str | dict[str, float]) -> str | dict[str, float]:
        for name, w in (weights.items() if isinstance(weights, dict) else ()):
            if not w > 0:  # also catches NaN
                raise ValueError(f"weight of class '{name}' must be > 0 (got {w})")
        return weights

    @model_validator(mode="after")
    def _settings_fit_the_method(self) -> "ImbalanceConfig":
        if isinstance(self.weights, dict) and self.method not in ("class_weights", "oversample"):
            raise ValueError(f"weights apply to method class_weights or oversample, not '{self.method}'")
        if self.gamma != 2.0 and self.method != "focal":
            raise ValueError(f"gamma applies to method focal, not '{self.method}'")
        return self


class _AugmentOp(_Section):
    p: float = Field(0.5, ge=0, le=1, description="probability that a training example gets this operation")


class SwapOp(_AugmentOp):
    op: Literal["swap"]
    n: int = Field(1, ge=1, description="pairs of words swapped")


class DeleteOp(_AugmentOp):
    op: Literal["delete"]
    rate: float = Field(0.1, gt=0, lt=1, description="each word is deleted with this probability (one stays)")


class InsertOp(_AugmentOp):
    op: Literal["insert"]
    n: int = Field(1, ge=1, description="WordNet synonyms of the text's own words inserted at random places")


class SynonymOp(_AugmentOp):
    op: Literal["synonym"]
    n: int = Field(1, ge=1, description="words replaced by a WordNet synonym")


class ContextualOp(_AugmentOp):
    op: Literal["contextual"]
    model: str = Field(description="masked-LM model (local folder or hub id) that proposes the substitute word")
    n: int = Field(1, ge=1, description="words replaced, one masked at a time")
    top_k: int = Field(10, ge=1, description="the substitute is drawn from the model's k likeliest whole words")


class RandomResizedCropOp(_AugmentOp):
    op: Literal["random_resized_crop"]
    p: float = Field(1.0, ge=0, le=1)
    scale: tuple[float, float] = Field((0.08, 1.0), description="share of the image area the crop covers")
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="range of the crop's aspect ratio")


class FlipOp(_AugmentOp):
    op: Literal["flip"]
    direction: Literal["horizontal", "vertical"] = "horizontal"


class RotateOp(_AugmentOp):
    op: Literal["rotate"]
    degrees: float = Field(15.0, gt=0, le=180, description="rotation drawn uniformly from [-degrees, degrees]")


class RandAugmentOp(_AugmentOp):
    op: Literal["randaugment"]
    p: float = Field(1.0, ge=0, le=1)
    n: int = Field(2, ge=1, description="operations applied per image")
    magnitude: int = Field(9, ge=0, le=30)


class TrivialAugmentOp(_AugmentOp):
    op: Literal["trivialaugment"]
    p: float = Field(1.0, ge=0, le=1)


class MixupOp(_AugmentOp):
    op: Literal["mixup"]
    p: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed")
    alpha: float = Field(0.2, gt=0, description="mixing weights drawn from Beta(alpha, alpha)")


class CutmixOp(_AugmentOp):
    op: Literal["cutmix"]
    p: float = Field(1.0, ge=0, le=1, description="probability that a batch gets a pasted box")
    alpha: float = Field(1.0, gt=0, description="pasted-box area share drawn from Beta(alpha, alpha)")


class DistillConfig(_Section):
    """Knowledge distillation (see distill.py): the student (model.name) learns from a teacher's soft targets."""
    teacher: str | None = Field(
        None, description="a tunesmith run folder (or its model/) or a model folder with the same label names; "
                          "null: no teacher")
    temperature: float = Field(2.0, gt=0, description="softens both sides' probabilities in the soft-target term")
    alpha: float = Field(
        0.5, ge=0, le=1, description="loss = alpha x T^2 x KL(teacher || student at temperature T) + (1 - alpha) "
                                     "x the hard-label loss (unlabeled inputs: the soft term only)")
    student_layers: int | None = Field(
        None, ge=1, description="keep this many of model.name's transformer blocks, evenly spread (the first and "
                                "the last included), as the student's start; null: all of them")

    @model_validator(mode="after")
    def _settings_need_a_teacher(self) -> "DistillConfig":
        for key in ("temperature", "alpha"):
            if self.teacher is None and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f"'{key}' applies with a teacher: set distill.teacher")
        return self


TEXT_AUGMENT_OPS = ("swap", "delete", "insert", "synonym", "contextual")
IMAGE_AUGMENT_OPS = ("random_resized_crop", "flip", "rotate", "randaugment", "trivialaugment", "mixup", "cutmix")
AugmentOp = Annotated[SwapOp | DeleteOp | InsertOp | SynonymOp | ContextualOp | RandomResizedCropOp | FlipOp
                      | RotateOp | RandAugmentOp | TrivialAugmentOp | MixupOp | CutmixOp, Field(discriminator="op")]


class OutputConfig(_Section):
    dir: str = "runs"
    name: str | None = Field(None, description="run folder name; default: <dataset>-<timestamp>")

    @field_validator("name")
    @classmethod
    def _inside_dir(cls, name: str | None) -> str | None:
        # the run folder is output.dir/name: '../x', 'a/b' or '/abs' would write outside output.dir
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name):
            raise ValueError("must be a plain folder name, without '/', '\\' or '..' (set output.dir for "
                             "where runs go)")
        return name


class CVConfig(_Section):
    """Cross-validation (`tunesmith cv`, and search.objective: cv)."""
    folds: int = Field(5, ge=2, description="k: stratified k-fold (group k-fold when data.group_column is set)")
    keep_models: bool = Field(
        False, description="keep every fold's model: the cv folder then predicts as their ensemble "
                           "(averaged probabilities) and the ensemble is scored on the test split")


class SearchParam(_Section):
    """One searched setting: a float or int range, or a list of choices."""
    type: Literal["float", "int", "categorical"] | None = Field(
        None, description="default: categorical when choices are given, else float")
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="sample uniformly in log space (learning rates, weight decay)")
    step: float | None = Field(None, gt=0, description="only multiples of step above low (not with log)")
    choices: list[bool | int | float | str | None] | None = None

    @property
    def kind(self) -> str:
        return self.type or ("categorical" if self.choices is not None else "float")

    @model_validator(mode="after")
    def _a_real_range(self) -> "SearchParam":
        if self.kind == "categorical":
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes choices, not low/high")
            if not self.choices:
                raise ValueError("empty choices: list at least one value")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.kind} parameter takes low and high, not choices")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.kind} parameter needs low and high")
        if not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        if self.kind == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError("an int parameter needs whole-number low and high")
        return self


def _searchable_key(key: str) -> str:
    """A search parameter must name one setting of the config, e.g. 'train.lr' or 'strategy.lora.r'."""
    leaves = _config_leaves(Config, "")
    if key in leaves:
        if key.split(".")[0] in ("search", "cv", "output", "export", "serve"):
            raise ValueError(f"'{key}' cannot be searched")
        return key
    close = difflib.get_close_matches(key, leaves, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (use a dotted config key such as train.lr)"
    raise ValueError(f"unknown search parameter '{key}'{hint}")


def _config_leaves(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for key, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _config_leaves(field.annotation, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


class SearchConfig(_Section):
    """Hyperparameter search (`tunesmith search`, Optuna TPE + median pruning)."""
    space: dict[Annotated[str, AfterValidator(_searchable_key)], SearchParam] = Field(
        {}, description="config key -> range, e.g. train.lr: {low: 1e-5, high: 1e-4, log: true}")
    trials: int = Field(20, ge=1, description="finished (complete or pruned) trials the study should reach")
    objective: Literal["validation", "cv"] = Field(
        "validation", description="validation: the best validation train.metric of one run; "
                                  "cv: its mean over cv.folds folds (k times the cost)")
    seed: int = Field(0, description="seed of the TPE sampler")
    startup_trials: int = Field(
        5, ge=0, description="random trials before TPE takes over, and trials before pruning starts")
    pruning: bool = Field(
        True, description="stop a trial whose validation metric falls below the median of earlier trials at "
                          "the same step (it needs several evaluations per run: set train.eval_every_steps)")
    pruning_warmup_steps: int = Field(0, ge=0, description="never prune before this many optimizer steps")
    storage: str | None = Field(
        None, description="Optuna storage URL shared by workers; default: sqlite:///<search folder>/study.db")
    keep_models: bool = Field(False, description="keep every trial's model/ (default: only its logs and metrics)")


class ExportConfig(_Section):
    """`tunesmith export RUN --format onnx` (flags on the command line override these)."""
    format: Literal["onnx"] = Field("onnx", description="the export format (ONNX, run by ONNX Runtime)")
    quantize: Literal["int8"] | None = Field(
        None, description="int8: dynamic int8 quantization of the weights (ONNX Runtime quantize_dynamic); "
                          "the parity report gives its accuracy change on the test split")
    opset: int = Field(18, ge=14, description="ONNX opset of the exported graph")
    batch_size: int = Field(64, ge=1, description="batch size of the parity run (PyTorch and ONNX Runtime)")
    max_abs_diff: float = Field(
        1e-3, gt=0, description="the fp32 export is refused when any output differs from PyTorch's by more")


class ServeConfig(_Section):
    """`tunesmith serve RUN` (any key: --serve.max_queue 512; --host, --port, --backend on the command line)."""
    host: str = Field("127.0.0.1", description="interface to listen on; loopback by default (0.0.0.0: every "
                                               "interface, reachable from the network)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    backend: Literal["torch", "onnx"] = Field("torch", description="onnx: run the export of `tunesmith export` "
                                                                   "(RUN/onnx) with ONNX Runtime")
    max_batch_size: int = Field(32, ge=1, description="inputs run together in one model call (micro-batching)")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="model calls that run at once, each in its own thread; auto: the CPU cores over the "
                            "threads one call uses (OMP_NUM_THREADS, else all cores: 1 worker), 1 on a GPU")
    batch_window_ms: float = Field(
        5.0, ge=0, description="how long the first waiting request waits for others to join its batch")
    pad_to_multiple_of: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="round each model call's text width up to a multiple of this many tokens: fewer "
                            "distinct shapes keep a PyTorch server's memory from growing with each new one; auto: "
                            "8 for PyTorch on a CPU, else as in training (bench/README.md, Serving under load)")
    max_queue: int = Field(
        256, ge=1, description="inputs waiting or running at most; beyond it a request gets 503 with Retry-After")
    retry_after_s: int = Field(1, ge=1, description="the Retry-After of a 503 answer (seconds)")
    max_inputs_per_request: int = Field(64, ge=1, description="more inputs in one request: 413")
    max_chars_per_input: int = Field(10_000, ge=1, description="a longer text: 413")
    max_image_bytes: int = Field(10 * 2**20, ge=1, description="a larger image (decoded from base64 or uploaded): 413")
    graceful_timeout_s: float = Field(
        30.0, gt=0, description="on SIGTERM / Ctrl-C: stop accepting, then wait this long for requests in flight")

    @model_validator(mode="after")
    def _a_request_fits_the_queue(self) -> "ServeConfig":
        if self.max_inputs_per_request > self.max_queue:
            raise ValueError(f"max_inputs_per_request ({self.max_inputs_per_request}) is larger than max_queue "
                             f"({self.max_queue}): such a request could never be queued")
        return self


TASK_NAMES = ("text_classification", "token_classification", "image_classification", "language_modeling",
              "causal_lm")


class Config(_Section):
    task: Literal["text_classification", "token_classification", "image_classification",
                  "language_modeling", "causal_lm"] = "text_classification"
    model: ModelConfig = ModelConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    output: OutputConfig = OutputConfig()
    cv: CVConfig = CVConfig()
    search: SearchConfig = SearchConfig()
    imbalance: ImbalanceConfig = ImbalanceConfig()
    distill: DistillConfig = DistillConfig()
    augment: list[AugmentOp] = Field(
        [], description="operations applied on the fly to training examples, in order, each with probability p "
                        "(text: swap, delete, insert, synonym, contextual; images: random_resized_crop, flip, "
                        "rotate, randaugment, trivialaugment, mixup, cutmix)")
    text_classification: TextClassificationConfig = TextClassificationConfig()
    token_classification: TokenClassificationConfig = TokenClassificationConfig()
    image_classification: ImageClassificationConfig = ImageClassificationConfig()
    language_modeling: LanguageModelingConfig = LanguageModelingConfig()
    causal_lm: CausalLMConfig = CausalLMConfig()
    report: bool = Field(
        True, description="write report.html (curves, confusion matrix, errors, config; see docs/report.md) into "
                          "the run, cv or search folder when it finishes; a report that fails is a warning only")
    tracking: list[Literal["tensorboard", "mlflow"]] = Field(
        [], description="also log metrics, the resolved config and the report to these trackers when the run "
                        "finishes (tensorboard: event files in <output.dir>/tensorboard/<run>; mlflow: tracking_uri)")
    tracking_uri: str | None = Field(
        None, description="MLflow tracking server URL or store URI (e.g. http://127.0.0.1:5000, sqlite:///mlflow.db); "
                          "default: a local file store in <output.dir>/mlruns")
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()

    def groups_by_length(self) -> bool:
        """train.group_by_length with auto resolved (see its description)."""
        if self.train.group_by_length != "auto":
            return self.train.group_by_length
        return not (self.task == "causal_lm" and self.causal_lm.packing)

    def uses_fast_dropout(self, device_type: str) -> bool:
        """train.fast_dropout with auto resolved (see its description) for training on `device_type`
        (torch.device.type: "cpu", "cuda", ...)."""
        if self.train.fast_dropout != "auto":
            return self.train.fast_dropout
        return device_type == "cpu"

    @field_validator("tracking", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `tracking: mlflow` means [mlflow]

    @model_validator(mode="before")
    @classmethod
    def _lora_for_language_models(cls, raw: Any) -> Any:
        """LoRA is the default strategy of causal_lm (all linear layers of the blocks): full fine-tuning of
        a 135M decoder moves 134.5M weights and keeps two AdamW moments for each (1.1 GB more on a CPU)."""
        if isinstance(raw, dict) and raw.get("task") == "causal_lm":
            strategy = raw.get("strategy")
            if strategy is None or (isinstance(strategy, dict) and "name" not in strategy):
                raw = {**raw, "strategy": {**(strategy or {}), "name": "lora"}}
        return raw

    @model_validator(mode="after")
    def _settings_fit_the_task(self) -> "Config":
        if self.imbalance.method != "none" and self.data.problem_type == "regression":
            raise ValueError(f"imbalance.method '{self.imbalance.method}' needs classes; regression has none")
        if self.token_classification.o_tag_weight != 1.0 and self.imbalance.method == "class_weights":
            raise ValueError("token_classification.o_tag_weight and imbalance.weights both weigh the O tag: "
                             "give O its weight in imbalance.weights instead")
        if self.task == "language_modeling" and (self.augment or self.imbalance.method != "none"):
            raise ValueError("task language_modeling takes no augment or imbalance settings (raw text has no "
                             "classes; masking is its own noise)")
        if self.task == "causal_lm" and self.augment:
            raise ValueError("augment: word augmentation is not available for task causal_lm (it would change what "
                             "the model learns to write)")
        if self.train.metric in ("exact_match", "token_f1") and not self.causal_lm.eval_generate:
            raise ValueError(f"train.metric {self.train.metric} scores generations: it needs causal_lm.eval_generate")
        wrong = IMAGE_AUGMENT_OPS if self.task != "image_classification" else TEXT_AUGMENT_OPS
        for op in self.augment:
            if op.op in wrong:
                raise ValueError(f"augment: '{op.op}' is for {'images' if op.op in IMAGE_AUGMENT_OPS else 'text'}, "
                                 f"not task {self.task}")
        self._check_distill()
        defaults = {name: type(getattr(self, name))() for name in TASK_NAMES}
        for name in TASK_NAMES:
            if name != self.task and getattr(self, name) != defaults[name]:
                raise ValueError(f"section '{name}' applies to task {name}, not '{self.task}'")
        if self.tracking_uri is not None and "mlflow" not in self.tracking:
            raise ValueError("tracking_uri is for MLflow: add mlflow to tracking (tracking: [mlflow])")
        return self

    def _check_distill(self) -> None:
        teacher = self.distill.teacher
        if self.data.unlabeled is not None and teacher is None:
            raise ValueError("data.unlabeled needs distill.teacher (the teacher labels those inputs)")
        if teacher is None:
            return
        if self.task not in ("text_classification", "token_classification", "image_classification"):
            raise ValueError(f"distill.teacher works with the classification tasks, not {self.task}")
        if self.task != "token_classification" and self.data.problem_type != "single_label":
            raise ValueError(f"distill.teacher works with single-label classes, not problem_type "
                             f"'{self.data.problem_type}'")
        if self.task == "image_classification" and self.augment:
            raise ValueError("distill.teacher with image augmentation is not supported: the teacher's outputs are "
                             "computed once per image, and augmentation changes the image every epoch")
        if self.image_classification.label_smoothing:
            raise ValueError("distill.teacher and image_classification.label_smoothing both soften the targets: "
                             "use one (the teacher's are per image)")
        if self.data.unlabeled is not None and self.imbalance.method == "oversample":
            raise ValueError("imbalance.method oversample draws labelled examples only: not with data.unlabeled")


# ---------------------------------------------------------------- reading YAML

MAX_YAML_VALUES = 10_000   # a full config is a few hundred values; aliases expanding past this are a bomb
MAX_SHOWN_CHARS = 80       # a value echoed in an error message is cut to this many characters
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses what it would otherwise accept silently: a repeated key (the last one
    won, so `train:` written twice dropped the first section) and aliases that expand to a huge value
    (nine levels of nine aliases: 472 bytes of YAML, 3.5 billion values for whatever walks them)."""

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand to more than {MAX_YAML_VALUES:,} values (an alias bomb?); "
                "write the values out", None)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *base` then a key of base overrides it: allowed
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = first_line.get(key)
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key '{shorten(key)}' (first on line {first}); each key may "
                        "appear once", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values the node stands for once every alias is replaced by its anchor's value; an alias
    is the same node object as its anchor, so each node is counted once (sizes memoises by id)."""
    if id(node) in sizes:
        if sizes[id(node)] < 0:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a value that contains it",
                                              node.start_mark)
        return sizes[id(node)]
    sizes[id(node)] = -1  # in progress: meeting it again below is a cycle
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    total = 1
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_YAML_VALUES:
            break
    sizes[id(node)] = total
    return total


def read_yaml(text: str) -> Any:
    """yaml.safe_load, refusing repeated keys and alias bombs (yaml.YAMLError, with the line)."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except RecursionError:  # PyYAML composes nested values recursively: thousands of '[' exhaust the stack
        raise yaml.composer.ComposerError(None, None, "values nested too deeply", None) from None


def shorten(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """A value as an error message may show it: its repr (str for strings), cut to `limit` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_override_value(text: str) -> Any:
    """'3e-5' -> 3e-05, 'true' -> True, 'null' -> None, anything else stays a string."""
    try:
        value = read_yaml(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads '3e-5' as a string; a plain float() rescues it.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys, e.g. {'train.lr': 3e-5}, in a nested dict (copying it)."""
    out = deep_copy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise TunesmithError(f"override {dotted}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def load_config(source: str | Path | dict | Config, overrides: dict[str, Any] | None = None,
                saved: bool = False) -> Config:
    """Read a YAML file (or dict) into a validated Config, applying dotted overrides. `saved`: a config
    tunesmith wrote into a run folder, whose keys from an older layout are moved where they live now."""
    if isinstance(source, Config):
        if not overrides:
            return source
        source = source.model_dump()
    origin = "config"
    text = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise not_found(path, "config file")
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:  # no read permission, an I/O error
            raise TunesmithError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        try:
            raw = read_yaml(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            loc = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise TunesmithError(f"{path}{loc}: {problem}") from None
        if raw is None:
            raise TunesmithError(f"{path}: config file is empty")
        if not isinstance(raw, dict):
            raise TunesmithError(f"{path}: the top level must be a mapping of sections (model, data, train...)")
    else:
        raw = source
    source_info = _Source(origin, text, raw, overrides or {})
    raw = apply_overrides(raw, overrides or {})
    if saved:
        raw = _move_old_keys(raw)
    _refuse_moved_keys(raw, source_info)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise TunesmithError(_describe_validation_error(exc, source_info)) from None


# Who gave the overrides, for error messages: the CLI (cli.main) sets this, so a bad `--train.lr abc` is
# reported as "command line --train.lr abc" and not at a line of the YAML file it overrides. A context
# variable, since load_config is reached from every command through code that need not know.
_FROM_COMMAND_LINE: ContextVar[bool] = ContextVar("tunesmith_overrides_from_command_line", default=False)


@contextmanager
def overrides_from_command_line() -> Iterator[None]:
    """Inside the block, errors in overrides name the command line."""
    token = _FROM_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _FROM_COMMAND_LINE.reset(token)


def override_origin(key: str, value: Any) -> str:
    """How an error names an override: 'command line --train.lr abc' (CLI) or "override train.lr='abc'" (Python)."""
    if _FROM_COMMAND_LINE.get():
        return f"command line --{key} {shorten(value)}"
    return f"override {key}={shorten(repr(value))}"


@dataclass
class _Source:
    """Where a config's values came from, for error messages: a file (or dict) and the overrides applied to it."""
    origin: str                 # the file's path, or "config" for a dict
    text: str | None            # the file's YAML text, for line numbers
    raw: Any                    # its values before the overrides
    overrides: dict[str, Any]

    def where(self, keys: list[str]) -> str:
        """The override that set the value at `keys`, else the file and the key's line (or its section's)."""
        key = self._override_of(keys)
        if key is not None:
            return override_origin(key, self.overrides[key])
        line = _yaml_line(self.text, keys) if self.text else None
        return f"{self.origin}, line {line}" if line else self.origin

    def _override_of(self, keys: list[str]) -> str | None:
        # an override at the key or above it replaced the value; one below it made the key only if the file
        # does not have it (e.g. --trian.lr 1: the unknown section 'trian' came from the command line)
        dotted = ".".join(keys)
        for key in self.overrides:
            if dotted == key or dotted.startswith(key + "."):
                return key
        if keys and not _holds(self.raw, keys):
            return next((key for key in self.overrides if key.startswith(dotted + ".")), None)
        return None


def _holds(raw: Any, keys: list[str]) -> bool:
    """Does the nested dict (or list) have a value at these keys?"""
    node = raw
    for key in keys:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False
    return True


def _move_old_keys(raw: dict) -> dict:
    raw = deep_copy(raw)
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for key in [k for k in data if f"data.{k}" in MOVED_KEYS]:
        section, name = MOVED_KEYS[f"data.{key}"].split(".")
        value = data.pop(key)
        if section == raw.get("task", "text_classification"):  # other tasks' keys held their defaults
            raw.setdefault(section, {})[name] = value
    return raw


def _refuse_moved_keys(raw: dict, source: _Source) -> None:
    data = raw.get("data")
    for key in data if isinstance(data, dict) else ():
        moved = MOVED_KEYS.get(f"data.{key}")
        if moved:
            raise TunesmithError(f"{source.where(['data', key])}: 'data.{key}' has moved to '{moved}' (the options "
                                 f"of one task live in its own section)")


AUGMENT_OPS = TEXT_AUGMENT_OPS + IMAGE_AUGMENT_OPS


def _describe_validation_error(exc: ValidationError, source: _Source) -> str:
    errors = exc.errors()
    err = errors[0]
    loc = list(err["loc"])
    key_error = bool(loc) and str(loc[-1]) == "[key]"  # the mapping key itself is wrong (search.space names config keys)
    loc = loc[:-1] if key_error else loc
    keys = _config_keys(loc)
    dotted = ".".join(keys)
    loc = source.where(keys)
    if err["type"] == "extra_forbidden":
        parent = _section_model(keys[:-1])
        hint = ""
        if parent is not None:
            close = difflib.get_close_matches(keys[-1], list(parent.model_fields), n=1)
            hint = f" (did you mean '{'.'.join(keys[:-1] + close[:1])}'?)" if close else \
                f" (known keys: {', '.join(parent.model_fields)})"
        return f"{loc}: unknown key '{dotted}'{hint}"
    if err["type"] == "missing":
        return f"{loc}: missing key '{dotted}'"
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        got = f" (got {shorten(repr(err['input'].get('op')))})" if isinstance(err.get("input"), dict) and "op" in err["input"] else ""
        return f"{loc}: {dotted}: 'op' must be one of {', '.join(AUGMENT_OPS)}{got}"
    if not keys:
        return f"{loc}: {err['msg'].removeprefix('Value error, ')}"
    value = err.get("input")
    shown = f" (got {shorten(repr(value))})" if value is not None and not isinstance(value, dict) and not key_error else ""
    msg = err["msg"].removeprefix("Value error, ")
    # a union with a literal ('auto'): pydantic's first message names only the other member
    others = [e["ctx"]["expected"] for e in errors[1:] if e["type"] == "literal_error" and
              _config_keys(list(e["loc"])) == keys and e["ctx"]["expected"].strip("'") not in msg]
    also = f" (or {', '.join(others)})" if others else ""
    return f"{loc}: {dotted}: {msg}{also}{shown}"


def _config_keys(loc: list) -> list[str]:
    """A pydantic error location as config keys: without the union members it tried ('float', 'constrained-float',
    "literal['auto']") nor an augment operation's tag."""
    return [str(k) for i, k in enumerate(loc)
            if not ("[" in str(k) or "-" in str(k) or k in ("float", "int", "str", "bool")
                    or (i and isinstance(loc[i - 1], int) and k in AUGMENT_OPS))]


def _section_model(keys: list[str]) -> type[BaseModel] | None:
    if len(keys) == 2 and keys[0] == "augment":  # an operation in the augment list: its fields are p and its own
        return None
    model: type[BaseModel] = Config
    for key in keys:
        field = model.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def locate(path: str | Path | None, dotted: str, overrides: dict[str, Any] | None = None) -> str:
    """Where a key's value came from, for errors found after loading: 'cfg.yaml, line 12', or the override
    that set it ('command line --imbalance.weights ...')."""
    text, raw = None, {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            raw = read_yaml(text)
        except (OSError, yaml.YAMLError):
            pass
    return _Source(str(path) if path is not None else "config", text, raw, overrides or {}).where(dotted.split("."))


def _yaml_line(text: str, keys: list[str]) -> int | None:
    """1-based line of a nested key in YAML text, or of its closest existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.SequenceNode) and key.isdigit() and int(key) < len(node.value):
            node = node.value[int(key)]  # a list item (augment.0): its line is its first key's
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def deep_copy(d: dict) -> dict:
    """A copy of nested dicts (the values themselves are shared)."""
    return {k: deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}
