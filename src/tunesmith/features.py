"""Cached frozen features: run the frozen bottom of the network once per training example, then
train only the top from the cache.

Valid because frozen modules run in eval mode (strategies.set_train_mode): no dropout, no moving
BatchNorm statistics, and the training loop builds a cache only when no augmentation changes the
inputs between epochs, so the bottom's output for an example is the same in every epoch.

What is kept is the output of the last frozen block (layouts.py: a transformer block, a CNN stage;
with linear_probe, the last block, i.e. what enters the head):
- text (the batch has input_ids): one row per real token, `tokens x hidden` (the first token alone
  when that block computes nothing else, see models.first_token_only);
- images: the whole output per example, `C x H x W` for a CNN stage, `tokens x width` for a ViT block.
It is float32, in memory up to `strategy.cache_memory_mb`, above that in a memory-mapped file in the
run folder, and not built at all when that file would take more than half the free disk (the cache
is then falsy, says why in `reason`, and its replay changes nothing).

Replaying a batch swaps the frozen blocks' modules for stand-ins (layouts.Layout.swap): the last
returns the cached output, the others return their input untouched. The embeddings still run (they
are cheap: a stem convolution, a lookup), everything above runs as usual, so the loss, the
gradients and the random numbers the top consumes (its dropout) are those of the uncached run.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .runlog import log
from .strategies import Plan


class _Stop(Exception):
    """Raised by the capture hook: nothing above the frozen blocks needs to run."""


class _Replay(nn.Module):
    """Stands in for the last frozen module: returns the cached output, shaped as that module returns it."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


class _Skip(nn.Module):
    """Stands in for a frozen module below the last one: passes its input on (the replay ignores it)."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) if self.as_tuple else x


class FeatureCache:
    """Outputs of the frozen bottom, `offsets[i]:offsets[i + 1]` the rows of example i. Falsy (and
    replaying nothing) when the cache was not built; `reason` then says why."""

    def __init__(self, plan: Plan, store: np.ndarray | None, offsets: np.ndarray | None, per_token: bool,
                 as_tuple: bool, device: torch.device, file: Path | None, reason: str = ""):
        self.plan, self.store, self.offsets, self.per_token = plan, store, offsets, per_token
        self.as_tuple, self.device, self.file, self.reason = as_tuple, device, file, reason
        self.nbytes = 0 if store is None else int(store.nbytes)

    def __bool__(self) -> bool:
        return self.store is not None

    def hidden(self, indices: list[int], width: int | None = None) -> torch.Tensor:
        """Cached outputs of these examples; text is zero-padded to `width` (the batch's, as collated)."""
        if not self.per_token:
            return torch.from_numpy(np.ascontiguousarray(self.store[np.asarray(indices)])).to(self.device)
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in indices]
        out = np.zeros((len(indices), width or max(lengths), self.store.shape[1]), dtype=np.float32)
        for row, (i, n) in enumerate(zip(indices, lengths)):
            out[row, :n] = self.store[self.offsets[i]:self.offsets[i] + n]
        return torch.from_numpy(out).to(self.device)

    @contextmanager
    def replay(self, indices: list[int], batch: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Inside, a forward pass over these examples (collated as `batch`) skips the frozen blocks
        and reads the cache.

        Text: padded positions hold zeros instead of what the blocks would compute there; the
        attention mask hides them from every real token, so the outputs at real tokens are unchanged.
        """
        if not self:
            yield
            return
        width = batch["input_ids"].shape[1] if batch is not None and "input_ids" in batch else None
        layout, k = self.plan.layout, self.plan.frozen_blocks
        paths = [path for block in layout.blocks[:k] for path in block]
        stand_ins = [_Skip(self.as_tuple) for _ in paths[:-1]] + [_Replay(self.hidden(indices, width), self.as_tuple)]
        originals = [layout.swap(path, module) for path, module in zip(paths, stand_ins)]
        try:
            yield
        finally:
            for path, module in zip(paths, originals):
                layout.swap(path, module)

    def close(self) -> None:
        self.store = None  # closes the memory map
        if self.file is not None:
            self.file.unlink(missing_ok=True)


def run_model(model: nn.Module, batch: Mapping[str, torch.Tensor]):
    """Hugging Face models take the batch as keywords; timm and torchvision models take the image tensor."""
    if "pixel_values" in batch and "pixel_values" not in inspect.signature(model.forward).parameters:
        return model(batch["pixel_values"])
    return model(**batch)


@torch.inference_mode()
def build_feature_cache(plan: Plan, model: nn.Module, features: list[dict], lengths: list[int],
                        collate: Callable[[list[dict]], dict], batch_size: int, device: torch.device,
                        precision: str, folder: Path, file_name: str = "feature_cache.f32") -> FeatureCache:
    """Run the frozen bottom over every example once (batched by length) and keep its output (a file
    folder/file_name when memory is not enough)."""
    last_frozen = plan.layout.module(plan.layout.blocks[plan.frozen_blocks - 1][-1])
    captured: dict = {}

    def capture(module, args, output):
        captured["as_tuple"] = isinstance(output, tuple)
        captured["hidden"] = output[0] if isinstance(output, tuple) else output
        raise _Stop

    store, file, offsets, kept, per_token = None, None, None, None, False
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
                    run_model(model, {k: v.to(device) for k, v in batch.items()})
                except _Stop:
                    pass
                hidden = captured["hidden"].float().cpu().numpy()
                if store is None:
                    per_token = "input_ids" in batch and hidden.ndim == 3
                    kept = _rows_kept(per_token, last_frozen, lengths)
                    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
                    row_shape = hidden.shape[2:] if per_token else hidden.shape[1:]
                    store, file, reason = _allocate((int(offsets[-1]), *row_shape),
                                                    plan.cfg.cache_memory_mb * 2**20, folder, file_name)
                    if store is None:
                        log(f"feature cache off: {reason}")
                        return FeatureCache(plan, None, None, per_token, False, device, None, reason)
                rows = hidden if per_token else hidden[:, None]  # images: one row per example
                for row, i in enumerate(idx):
                    store[offsets[i]:offsets[i + 1]] = rows[row, :kept[i]]
    finally:
        handle.remove()
        model.train(was_training)
    return FeatureCache(plan, store, offsets, per_token, captured["as_tuple"], device, file)


def _rows_kept(per_token: bool, last_frozen: nn.Module, lengths: list[int]) -> list[int]:
    """Rows kept per example: its tokens, or only the first when that is all the block computes;
    one (the whole output) for an image."""
    if per_token and not getattr(last_frozen, "first_token_only", False):
        return list(lengths)
    return [1] * len(lengths)


def _allocate(shape: tuple[int, ...], memory_limit: int, folder: Path,
              file_name: str = "feature_cache.f32") -> tuple[np.ndarray | None, Path | None, str]:
    """In memory up to memory_limit bytes; else a memory-mapped file, up to half the free disk
    (the rest is left for checkpoints); else nothing, and why."""
    nbytes = int(np.prod(shape)) * 4
    if nbytes <= memory_limit:
        return np.empty(shape, dtype=np.float32), None, ""
    free = shutil.disk_usage(folder).free
    if nbytes > free // 2:
        return None, None, (f"the frozen blocks' outputs would take {nbytes / 2**20:,.0f} MiB, more than "
                            f"strategy.cache_memory_mb ({memory_limit / 2**20:,.0f}) and half the free disk "
                            f"in {folder} ({free / 2**21:,.0f} MiB); the frozen blocks run every step")
    file = folder / file_name
    return np.memmap(file, dtype=np.float32, mode="w+", shape=shape), file, ""
