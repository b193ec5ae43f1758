"""Batches for causal language models: packed rows with per-example attention, padded rows, the loss
over target tokens only, and batched greedy (or sampled) generation with left padding.

Packing: a batch's examples are laid end to end in one row, each example's positions restarting at 0, and
no attention_mask is given. The model runs with PACKED_ATTENTION: in such a row, attention runs example
by example (causal SDPA over each one's own tokens), so a token attends only to earlier tokens of its own
example and no work is spent on padding or across examples (a mask over the whole row would cost the
square of the row's width). Anything else (a padded batch with its attention_mask, a generation step
reading the cache) is plain SDPA. The first token of every example carries no label, so the last token of
one example is never trained to predict the first of the next: the loss is the same as unpacked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import use_attention
from .tasks.base import IGNORE


PACKED_ATTENTION = "tunesmith_packed"


def use_packed_attention(model: torch.nn.Module) -> None:
    """Give the model PACKED_ATTENTION (registered with transformers on first use). A Hugging Face model's
    config keeps the name only in memory: a saved folder loads with the library's default attention."""
    use_attention(model, PACKED_ATTENTION, _packed_attention, _packed_attention_mask)


def _packed_attention_mask(**kwargs):
    """No mask without padding (the attention finds the examples in the position ids); with padding, SDPA's."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


def _packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA, example by example within rows where the position ids restart (query/key: batch, heads, width,
    head dim); returns (batch, width, heads, head dim) as every transformers attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.pop("position_ids", None)
    width = query.shape[2]
    if attention_mask is not None or positions is None or key.shape[2] != width or positions.shape[-1] != width:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows = []
    for r, starts in enumerate(_example_starts(positions.expand(query.shape[0], -1))):
        bounds = starts + [width]
        rows.append(torch.cat([
            sdpa_attention_forward(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b],
                                   None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
            for a, b in zip(bounds[:-1], bounds[1:])], dim=1))
    return torch.cat(rows, dim=0), None


def _example_starts(positions: torch.Tensor) -> list[list[int]]:
    """Per row, where each example begins: position 0 (the first token always begins one)."""
    starts = positions == 0
    starts[:, 0] = True
    return [torch.nonzero(row).flatten().tolist() for row in starts]


def collate(features: list[dict], pad_id: int, pack: bool, multiple: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, target_ids (IGNORE where nothing is learned) and example_index (which feature of the batch
    a token belongs to, -1 on padding); packed: the batch in one row with position_ids; else a row per
    example, padded, with an attention_mask."""
    lengths = [len(f["input_ids"]) for f in features]
    rows = [list(range(len(features)))] if pack else [[i] for i in range(len(features))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    width = -(-width // multiple) * multiple
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    example = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    has_targets = any("labels" in f for f in features)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = lengths[i]
            input_ids[r, at:at + n] = torch.as_tensor(features[i]["input_ids"])
            if "labels" in features[i]:
                targets[r, at:at + n] = torch.as_tensor(features[i]["labels"])
            example[r, at:at + n] = i
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding: a segment of its own
    batch = {"input_ids": input_ids, "example_index": example}
    if has_targets:
        batch["target_ids"] = targets
    if pack:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = (example >= 0).long()
    return batch


def forward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per example [loss sum, target tokens], mean loss over the batch's target tokens or None).

    The mean is over tokens, as Hugging Face's own causal-LM loss (so a packed batch and the same examples
    unpacked give the same loss); the per-example sums give split-level loss and perplexity."""
    example = batch["example_index"]
    n = int(example.max()) + 1
    targets = batch.get("target_ids")
    if targets is None:  # prompts only (predict): generation does the work
        return torch.zeros((n, 2), device=example.device), None
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    # position t predicts token t + 1; only the positions that carry loss go on to the fp32 cross-entropy (a
    # vocabulary of 49,152 makes the logits of all positions in fp32 the largest tensor of a step: a validation
    # batch of 115 chatterbot pairs peaked 1.8 GB higher in RSS that way: 6.5 against 4.7 GB)
    shifted = targets[:, 1:]
    counted = shifted != IGNORE
    token_loss = F.cross_entropy(logits[:, :-1][counted].float(), shifted[counted], reduction="none")
    owner = example[:, 1:][counted]
    sums = torch.zeros(n, device=logits.device).index_add_(0, owner, token_loss.detach())
    counts = torch.zeros(n, device=logits.device).index_add_(0, owner, torch.ones_like(token_loss))
    loss = token_loss.sum() / counted.sum().clamp(min=1)
    return torch.stack([sums, counts], dim=1), loss


@torch.inference_mode()
def generate(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, stop_ids: list[int],
             max_new_tokens: int, batch_size: int, device: torch.device, precision: str,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt (without the stop token): batches of similar length, left-padded so
    every prompt ends where generation starts; greedy unless temperature > 0."""
    from transformers import GenerationConfig

    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=stop_ids,
                              pad_token_id=pad_id, **({"temperature": temperature, "top_p": top_p, "top_k": 0}
                                                      if sample else {}))
    if sample:
        torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
                    mask[row, width - len(prompts[i]):] = 1
                new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)[:, width:].tolist()
                for row, i in enumerate(idx):
                    tokens = new[row]
                    cut = next((k for k, t in enumerate(tokens) if t in stop_ids), len(tokens))
                    out[i] = tokens[:cut]
    finally:
        model.train(was_training)
    return out
