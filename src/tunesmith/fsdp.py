"""FSDP: the weights, gradients and optimizer state sharded over the processes of a launch, for models that
do not fit one device. Asked for with `accelerate launch --use_fsdp ...` or `tunesmith train --processes N --fsdp`.

tunesmith shards with torch's FSDP2 (`fully_shard`) itself, whatever accelerate's --fsdp_version says: one unit
per block of the model's layout (layouts.py) and one for the rest (embeddings, head). accelerate forms FSDP only
on accelerator devices, while `fully_shard` also runs on CPUs (gloo): so the one code path here is the one the
tests run. Each forward gathers a unit's weights from every process and frees them after it; each backward
reduce-scatters the gradients (averaged, as DDP does); each process keeps and steps its shard only.

Whole-model files stay whole: model/ and the checkpoints hold the full state dicts, gathered to the main process's
CPU memory (it writes them) and sent from it on load: a checkpoint written under FSDP is a plain one, and model/
loads in plain transformers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .errors import TunesmithError
from .layouts import find_layout
from .runlog import count, log

# accelerate launch --use_fsdp options that would change memory or results, and tunesmith does not apply
UNSUPPORTED_OPTIONS = {"FSDP_OFFLOAD_PARAMS": "--fsdp_offload_params", "FSDP_ACTIVATION_CHECKPOINTING":
                       "--fsdp_activation_checkpointing"}


def requested() -> bool:
    """A launch of several processes with FSDP (accelerate launch --use_fsdp sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and distributed.processes() > 1


def check_options() -> None:
    """The accelerate FSDP options tunesmith does not apply: refused, not silently ignored. And every process
    loads the whole pretrained model: accelerate launch sets FSDP_CPU_RAM_EFFICIENT_LOADING=true, with which
    transformers leaves the weights of processes other than the first on the meta device, for accelerate to
    fill from the first when it wraps the model (measured: the head then stayed on meta, and fully_shard refused
    it). Every process builds the same model from the same seed instead, as under DDP."""
    for variable, flag in UNSUPPORTED_OPTIONS.items():
        if os.environ.get(variable, "").lower() == "true":
            raise TunesmithError(f"accelerate launch {flag} true: not supported with tunesmith's FSDP (it shards "
                                 "weights, gradients and optimizer state only); launch without it")
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def check_strategy(strategy: str) -> None:
    """LoRA's merged model/ is made from a whole copy of the model in one process: not done under FSDP."""
    if strategy == "lora":
        raise TunesmithError("strategy.name: lora is not supported under FSDP (its adapter is small: launch without "
                             "--use_fsdp / --fsdp for DDP, see docs/distributed.md)")


def is_sharded(model: nn.Module) -> bool:
    """Without importing torch.distributed.fsdp (0.57 s here): no model is sharded before shard() imported it."""
    module = sys.modules.get("torch.distributed.fsdp")
    return module is not None and isinstance(model, module.FSDPModule)


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """fully_shard on each block of the model's layout, then on the whole (what is left: embeddings, head).
    In place: the parameters become DTensors holding this process's shard, so the optimizer is built after."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    n = distributed.processes()
    mesh = init_device_mesh(device.type, (n,))  # fully_shard puts each shard on the mesh's device
    layout = find_layout(model)
    blocks = layout.blocks if layout is not None else []
    for paths in blocks:  # a block is usually one module; a VGG block is a run of modules, one unit together
        modules = [layout.module(p) for p in paths]
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    # what each process holds, measured on the shards themselves (a model left whole would show n x its share)
    held = distributed.gather(sum(p.to_local().numel() for p in model.parameters()))
    total = sum(p.numel() for p in model.parameters())
    log(f"FSDP: {len(blocks) + 1} units ({len(blocks)} {layout.block_word if layout else 'blocks'} + the rest); "
        f"parameters held per process: {', '.join(count(h) for h in held)} of {count(total)}")
    return model


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole gradient: torch computes it over the DTensor shards of every process."""
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The whole model's (and optimizer's) state dicts, on the main process's CPU; empty on the others. Every
    process must call it (the shards are gathered). Optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    _reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = _tied_as_one(model, get_model_state_dict(model, options=options))
    optim = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return weights, optim


def load_full_state(model: nn.Module, weights: dict, optimizer: torch.optim.Optimizer | None = None,
                    optim: dict | None = None) -> None:
    """Whole state dicts read by the main process (empty dicts elsewhere), sent to every process, each keeping
    its shard. Every process must call it. A tied weight saved once (safetensors keeps one name) gets its twin."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    _reshard(model)
    if distributed.is_main():
        weights = with_tied_names(model, weights)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim if distributed.is_main() else {}, options=options)


def load_weights_file(model: nn.Module, path: Path) -> None:
    """model.safetensors (a whole model, as model/ and the checkpoints hold) into a sharded model."""
    from safetensors.torch import load_file

    load_full_state(model, load_file(str(path)) if distributed.is_main() else {})


def _reshard(model: nn.Module) -> None:
    """Every unit back to its shards. The outermost unit keeps its weights gathered after a forward (FSDP2
    expects the backward to need them next): after an evaluation, loading a state dict then met whole tensors
    where it expected shards (measured: 'aten.copy_.default got mixed torch.Tensor and DTensor')."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def unshared(weights: dict) -> dict:
    """Each tensor written once, as safetensors needs (it refuses tensors that share memory): a name whose
    tensor is the very view an earlier name holds (tied weights) is left out, as safetensors' save_model does;
    another view of a storage already kept (a slice of a fused weight) is copied, so no values are lost."""
    storages: set[int] = set()
    views: set[tuple] = set()
    out = {}
    for name, tensor in weights.items():
        if not tensor.numel():
            out[name] = tensor
            continue
        storage = tensor.untyped_storage().data_ptr()
        view = (storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in views:
            continue
        views.add(view)
        out[name] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    return out


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each parameter that several names share (tied input and output embeddings)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _tied_as_one(model: nn.Module, weights: dict) -> dict:
    """A tied weight gathered under each of its names comes back as separate copies: one tensor for all its
    names again, so that save_pretrained and safetensors write it once, as they do for a whole model
    (measured on a tied Llama: model/ had lm_head.weight besides model.embed_tokens.weight)."""
    for group in _tied_names(model) if weights else []:
        present = [n for n in group if n in weights]
        for name in present[1:]:
            weights[name] = weights[present[0]]
    return weights


def with_tied_names(model: nn.Module, weights: dict) -> dict:
    """Each name of a parameter that several names share (tied embeddings), given the saved name's tensor."""
    weights = dict(weights)
    for group in _tied_names(model):
        saved = next((n for n in group if n in weights), None)
        for name in group:
            if saved is not None and name not in weights:
                weights[name] = weights[saved]
    return weights
