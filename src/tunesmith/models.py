"""Backbone resolution (catalog name | local folder | hub id), loading, the optimizer's parameter
groups, the first-token-only last block of BERT-style classifiers, and tunesmith's own attention functions
given to a Hugging Face model."""

from __future__ import annotations

import os
import socket
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from . import catalog
from .errors import TunesmithError


def resolve_model(name: str) -> str:
    """A local folder for catalog names and paths; hub ids are returned unchanged."""
    folder = catalog.model_path(name)
    if folder is not None:
        return str(folder)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunesmithError(f"{path}: model folder has no config.json (expected a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix:
        raise TunesmithError(f"model '{name}': folder not found (catalog names: {', '.join(catalog.MODELS)})")
    return name


def weights_options(source: str, allow_pickle: bool) -> dict[str, Any]:
    """from_pretrained arguments that read a backbone's weights from safetensors only.

    A pickled pytorch_model.bin is a program for the unpickler: transformers reads it with
    torch.load(weights_only=True), which blocks the known attacks, but safetensors holds nothing but
    tensors. So a folder with only pickled weights is refused unless model.allow_pickle is set. Catalog
    folders are built by tunesmith from checksummed packages and load as they are."""
    if allow_pickle:
        return {}
    folder = Path(source)
    if folder.is_dir() and _inside(folder, catalog.cache_dir() / "models"):
        return {}
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
        if pickled:
            raise TunesmithError(
                f"{folder}: the weights are pickled ({pickled[0]}) and there is no .safetensors file; unpickling "
                "can run code hidden in the file, so tunesmith loads safetensors only. Convert the weights "
                "(save_pretrained writes safetensors), or set model.allow_pickle: true if you trust the file")
    return {"use_safetensors": True}


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (and offline mode is off)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def from_pretrained(loader: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with one clear error instead of a minute of hub retries."""
    is_local = Path(source).is_dir()
    try:
        if not is_local:
            try:  # the hub id may already be in the local Hugging Face cache
                return loader(source, local_files_only=True, **kwargs)
            except OSError:
                if not hub_reachable():
                    raise TunesmithError(
                        f"model '{source}' is not a catalog name ({', '.join(catalog.MODELS)}) or a local folder, "
                        "and the Hugging Face hub cannot be reached (offline?)") from None
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunesmithError(f"model '{source}': could not load: {first}") from None


def parameter_groups(params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                     lr: float | None = None, name: str = "") -> list[dict]:
    """AdamW groups: no weight decay on biases and normalisation weights (1-D tensors).

    Strategies call this once per layer (`name` e.g. 'layer.3', with that layer's `lr`);
    empty groups are left out.
    """
    named = params.named_parameters() if isinstance(params, torch.nn.Module) else params
    decay, no_decay = [], []
    for param_name, param in named:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in param_name.lower() else decay).append(param)
    prefix = f"{name}/" if name else ""
    groups = [{"params": decay, "weight_decay": weight_decay, "name": prefix + "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": prefix + "no_decay"}]
    if lr is not None:
        for group in groups:
            group["lr"] = lr
    return [g for g in groups if g["params"]]


def use_attention(model: torch.nn.Module, name: str, attention: Callable[..., Any], mask: Callable[..., Any]) -> None:
    """Run this model's attention with `attention`, and build the masks it is given with `mask`: transformers
    finds both by the name in the model's config, so they are registered under `name` on first use. Only the
    config in memory holds the name: a saved folder loads with the library's default attention. A model class
    that takes only the library's own names raises what its set_attn_implementation raises."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask)
    model.set_attn_implementation(name)


def set_dropout(model: torch.nn.Module, p: float) -> int:
    """Every torch.nn.Dropout of the model at drop probability p, in memory only (the config, and so the saved
    model, keeps its own); returns how many. BERT-style attention reads its module's p at each call."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    for layer in layers:
        layer.p = p
    return len(layers)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


# Sequence classifiers whose head reads nothing of the last block's output but the first token
# ([CLS] / <s>), and whose blocks have BERT's layout (attention.self.query/key/value, attention.output,
# intermediate, output).
FIRST_TOKEN_HEADS = ("BertForSequenceClassification", "RobertaForSequenceClassification",
                     "XLMRobertaForSequenceClassification", "CamembertForSequenceClassification",
                     "ElectraForSequenceClassification")


def first_token_only(model: torch.nn.Module) -> bool:
    """Let the last block compute its output for the first token only, where the head reads no other.

    The head of a BERT-style sequence classifier reads the first token of the last block's output.
    That block still needs keys and values for every token, but queries, attention output and
    feed-forward only for the first one: the same logits and gradients to float rounding, with
    about a seventh fewer FLOPs on a 6-block model and no attention matrix over every position
    (bench/README.md). Only this instance's last block changes (its `forward`), so the weights, the
    saved folder and the Hugging Face class stay as they were. Returns whether it applied.
    """
    config = getattr(model, "config", None)
    if type(model).__name__ not in FIRST_TOKEN_HEADS or config is None:
        return False
    if (config.is_decoder or getattr(config, "add_cross_attention", False) or config.chunk_size_feed_forward
            or getattr(config, "position_embedding_type", "absolute") not in (None, "absolute")
            or config._attn_implementation not in ("eager", "sdpa")):
        return False
    blocks = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not blocks:
        return False
    last = blocks[-1]
    try:
        attn = last.attention.self
        _ = (attn.query, attn.key, attn.value, attn.attention_head_size, attn.scaling, attn.dropout,
             last.attention.output, last.intermediate, last.output)
    except AttributeError:
        return False
    last.forward = types.MethodType(_first_token_block_forward, last)
    last.first_token_only = True
    return True


def _first_token_block_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                               *args: Any, **kwargs: Any) -> torch.Tensor:
    """BertLayer.forward for the first position only: (batch, width, hidden) -> (batch, 1, hidden)."""
    if attention_mask is not None and attention_mask.dim() != 4:  # a mask layout this was not written for
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    attn = self.attention.self
    batch, width, _ = hidden_states.shape
    first = hidden_states[:, :1]
    heads = (-1, attn.attention_head_size)
    query = attn.query(first).view(batch, 1, *heads).transpose(1, 2)
    key = attn.key(hidden_states).view(batch, width, *heads).transpose(1, 2)
    value = attn.value(hidden_states).view(batch, width, *heads).transpose(1, 2)
    mask = attention_mask
    if mask is not None:  # (batch, 1, width or 1, width): the first query's row
        mask = mask[:, :, :1, :]
        if mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling,
                                             dropout_p=attn.dropout.p if attn.training else 0.0)
    context = context.transpose(1, 2).reshape(batch, 1, -1)
    attention_output = self.attention.output(context, first)
    return self.output(self.intermediate(attention_output), attention_output)
