"""Dropout with cheaper random masks, for training on CPUs.

torch's CPU dropout draws every element's mask from a Bernoulli generator, ~6-10 ns per element: about a
fifth of a bf16 MiniLM training step on an AVX512-BF16 EPYC (bench/README.md, "Dropout masks"). Here one
64-bit draw from torch's generator gives four elements 16 random bits each, and an element is dropped where
its bits fall under round(p * 65536): it is dropped with probability p' = round(p * 65536) / 65536 (within
8e-6 of p) and kept values are scaled by 1 / (1 - p'), so the expectation is unchanged, as with torch's.
Masks are independent between elements and calls; the random stream differs from torch.nn.Dropout's, and
a seed still fixes it (the draws come from torch's default generator, saved in checkpoints).

use_fast_dropout(model) swaps the forward of each nn.Dropout module of that model instance (nothing is
saved differently) and, for a Hugging Face model running SDPA, the attention-probability dropout, which
SDPA would draw with the Bernoulli generator: the same attention computed as SDPA's math path does it,
with this mask. On GPUs torch's fused dropout is already cheap: the training loop uses this on CPUs only.
"""

from __future__ import annotations

import math
import types

import torch

from .models import use_attention

FAST_DROPOUT_ATTENTION = "tunesmith_sdpa"
_LEVELS = 65536


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask of `shape`, each element False (dropped) with probability round(p * 65536) / 65536."""
    n = math.prod(shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)  # all 64 bits
    return bits.view(torch.int16)[:n].view(shape) >= round(p * _LEVELS) - _LEVELS // 2


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        scale = _LEVELS / (_LEVELS - round(p * _LEVELS))  # 1 / (1 - p')
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the cheaper mask."""
    if not training or p == 0:
        return x
    if p >= 1:
        return x * 0
    return _Dropout.apply(x, p)


def _dropout_forward(self: torch.nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Give this model instance the cheaper dropout masks; returns how many dropout modules it swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Dropout and not module.inplace:
            module.forward = types.MethodType(_dropout_forward, module)
            swapped += 1
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation"):
        from transformers.masking_utils import sdpa_mask

        try:
            use_attention(model, FAST_DROPOUT_ATTENTION, _attention, sdpa_mask)
        except (ValueError, NotImplementedError):  # a model class that takes only the library's own names
            pass
    return swapped


def _attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' SDPA attention, except in training a bidirectional encoder (query/key/value: batch,
    heads, width, head dim), where it computes what SDPA's math path computes (scores and softmax in float32,
    as SDPA does for bf16 inputs on a CPU) with the cheaper mask. Without attention dropout too: SDPA's own
    CPU kernel made a bf16 MiniLM training step 0.83x as fast as this path (fp32 0.97x; bench/README.md).
    Returns (batch, width, heads, head dim) as every transformers attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = (not module.training or kwargs.get("is_causal") or getattr(module, "is_causal", False)
             or getattr(module, "num_key_value_groups", 1) > 1 or kwargs.get("position_bias") is not None
             or key.shape[1] != query.shape[1])
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    dtype, wide = value.dtype, torch.promote_types(value.dtype, torch.float32)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # autocast would run these matmuls in bf16: scores in bf16 made the attention 7x less accurate than SDPA's
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.to(wide) * scale, key.to(wide).transpose(-1, -2))
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = fast_dropout(torch.softmax(scores, dim=-1), dropout)
        output = torch.matmul(probs, value.to(wide)).to(dtype)
    return output.transpose(1, 2).contiguous(), None
