"""Cached frozen features: run the frozen bottom of the network once per training example, then
train only the top from the cache.

Valid because frozen modules run in eval mode (strategies.set_train_mode): no dropout, no moving
statistics, and no data augmentation exists, so the bottom's output for an example is the same in
every epoch. The cache holds the output of the last frozen block for each example's real tokens
(float32, `tokens x hidden`; the first token alone when that block computes nothing else, see
models.first_token_only), in memory or, above `strategy.cache_memory_mb`, in a memory-mapped
file in the run folder. Replaying a batch swaps the frozen blocks for one module that returns the
cached hidden states; everything above runs as usual, so the loss, the gradients and the random
numbers the top consumes (its dropout) are those of the uncached run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .strategies import Plan


class _Stop(Exception):
    """Raised by the capture hook: nothing above the frozen blocks needs to run."""


class _Replay(nn.Module):
    """Stands in for the frozen blocks: returns the cached output, shaped as the last block returns it."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class FeatureCache:
    def __init__(self, plan: Plan, model: nn.Module, store: np.ndarray, offsets: np.ndarray, as_tuple: bool,
                 device: torch.device, file: Path | None):
        self.plan, self.model, self.store, self.offsets = plan, model, store, offsets
        self.as_tuple, self.device, self.file = as_tuple, device, file
        self.nbytes = int(store.nbytes)

    def hidden(self, indices: list[int], width: int | None = None) -> torch.Tensor:
        """Cached hidden states of these examples, zero-padded to `width` (the batch's, as collated)."""
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in indices]
        out = np.zeros((len(indices), width or max(lengths), self.store.shape[1]), dtype=np.float32)
        for row, (i, n) in enumerate(zip(indices, lengths)):
            out[row, :n] = self.store[self.offsets[i]:self.offsets[i] + n]
        return torch.from_numpy(out).to(self.device)

    @contextmanager
    def replay(self, indices: list[int], width: int | None = None) -> Iterator[None]:
        """Inside, a forward pass over these examples skips the frozen blocks and reads the cache.

        Padded positions hold zeros instead of what the blocks would compute there; the attention
        mask hides them from every real token, so the outputs at real tokens are unchanged.
        """
        layout = self.plan.layout
        blocks = layout.blocks
        replay = _Replay(self.hidden(indices, width), self.as_tuple)
        setattr(layout.blocks_owner, layout.blocks_attr, nn.ModuleList([replay, *blocks[self.plan.frozen_blocks:]]))
        try:
            yield
        finally:
            setattr(layout.blocks_owner, layout.blocks_attr, blocks)

    def close(self) -> None:
        self.store = None  # closes the memory map
        if self.file is not None:
            self.file.unlink(missing_ok=True)


@torch.inference_mode()
def build_feature_cache(plan: Plan, model: nn.Module, features: list[dict], lengths: list[int],
                        collate: Callable[[list[dict]], dict], batch_size: int, device: torch.device,
                        precision: str, folder: Path) -> FeatureCache:
    """Run the frozen bottom over every example once (batched by length) and keep its output."""
    last_frozen = plan.layout.blocks[plan.frozen_blocks - 1]
    captured: dict = {}

    def capture(module, args, output):
        captured["as_tuple"] = isinstance(output, tuple)
        captured["hidden"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    # rows kept per example: its tokens, or only the first when that is all the block computes
    kept = [1] * len(lengths) if getattr(last_frozen, "first_token_only", False) else lengths
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    store, file = None, None
    order = np.argsort(lengths, kind="stable")
    was_training = model.training
    model.eval()
    handle = last_frozen.register_forward_hook(capture)
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = collate([features[i] for i in idx])
                batch.pop("labels", None)
                try:
                    model(**{k: v.to(device) for k, v in batch.items()})
                except _Stop:
                    pass
                hidden = captured["hidden"].float().cpu().numpy()
                if store is None:
                    store, file = _allocate((int(offsets[-1]), hidden.shape[-1]),
                                            plan.cfg.cache_memory_mb * 2**20, folder)
                for row, i in enumerate(idx):
                    store[offsets[i]:offsets[i + 1]] = hidden[row, :kept[i]]
    finally:
        handle.remove()
        model.train(was_training)
    return FeatureCache(plan, model, store, offsets, captured["as_tuple"], device, file)


def _allocate(shape: tuple[int, int], memory_limit: int, folder: Path) -> tuple[np.ndarray, Path | None]:
    if shape[0] * shape[1] * 4 <= memory_limit:
        return np.empty(shape, dtype=np.float32), None
    file = folder / "feature_cache.f32"
    return np.memmap(file, dtype=np.float32, mode="w+", shape=shape), file
