"""Fine-tuning strategies: which parameters learn, at what learning rate, and when.

A model is seen as layers, bottom to top: `embeddings` (every base-model parameter outside the
transformer blocks, except a pooler), `layer.0` ... `layer.{L-1}` (the blocks: the largest
ModuleList in the base model, so BERT, RoBERTa, MPNet, DistilBERT, ELECTRA and Llama-style models
all work), and `head` (everything outside the base model, plus the base model's pooler).

    full              everything learns
    freeze            embeddings and/or the bottom blocks stay fixed
    linear_probe      only the head learns
    gradual_unfreeze  the head first, then one more layer from the top every K epochs/steps
    lora              peft low-rank adapters; the head learns in full

`layerwise_lr_decay` gives layer d levels below the head the rate lr * decay**d
(head 0, top block 1, ..., embeddings L+1). Frozen modules run in eval mode, so their dropout is
off and normalisation statistics do not move -- which also makes their outputs cacheable
(features.py).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, StrategyConfig
from .errors import TunesmithError
from .models import parameter_groups

EMBEDDINGS, HEAD = "embeddings", "head"


@dataclass
class Layout:
    """Where the layers of a model are."""
    blocks_owner: nn.Module      # the module holding the block list (e.g. bert.encoder)
    blocks_attr: str             # the list's attribute name on it (e.g. "layer")
    num_blocks: int
    layer_of: dict[str, str]     # parameter name -> "embeddings" | "layer.3" | "head"

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self.blocks_owner, self.blocks_attr)

    def depth(self, layer: str) -> int:
        """Levels below the head: head 0, top block 1, ..., embeddings num_blocks + 1."""
        if layer == HEAD:
            return 0
        if layer == EMBEDDINGS:
            return self.num_blocks + 1
        return self.num_blocks - int(layer.split(".")[1])

    def params(self, model: nn.Module, layer: str) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if self.layer_of.get(n) == layer]


def find_layout(model: nn.Module) -> Layout | None:
    """Blocks, embeddings and head of a Hugging Face model; None when it has no block list."""
    base = getattr(model, "base_model", model)
    base_prefix = next(name for name, m in model.named_modules() if m is base)
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return None
    list_name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    owner_name, _, attr = list_name.rpartition(".")
    owner = base.get_submodule(owner_name) if owner_name else base
    join = lambda *parts: ".".join(p for p in parts if p)  # noqa: E731
    blocks_prefix, base_dot = join(base_prefix, list_name) + ".", join(base_prefix) + "." if base_prefix else ""
    layer_of = {}
    for name, _ in model.named_parameters():
        if name.startswith(blocks_prefix):
            layer_of[name] = f"layer.{name[len(blocks_prefix):].split('.')[0]}"
        elif name.startswith(base_dot) and "pooler" not in name:
            layer_of[name] = EMBEDDINGS
        else:
            layer_of[name] = HEAD
    return Layout(owner, attr, len(blocks), layer_of)


def frozen_block_count(freeze_layers: int | float, num_blocks: int) -> int:
    """freeze_layers (count, fraction, or negative = from the top) -> blocks frozen from the bottom."""
    if isinstance(freeze_layers, float) and not freeze_layers.is_integer():
        count = round(abs(freeze_layers) * num_blocks)
    else:
        count = abs(int(freeze_layers))
        if count > num_blocks:
            raise TunesmithError(f"strategy.freeze_layers: {freeze_layers} is out of range: "
                                 f"the model has {num_blocks} transformer blocks")
    return num_blocks - count if freeze_layers < 0 else count


@dataclass
class Plan:
    """A strategy applied to one model: what is frozen, the LR of each layer, what unfreezes when."""
    cfg: StrategyConfig
    lr: float
    weight_decay: float
    layout: Layout | None
    frozen_blocks: int = 0                          # contiguous from the bottom (freeze, linear_probe)
    pending: list[str] = field(default_factory=list)  # gradual_unfreeze: still frozen, next first
    every_steps: int = 0                            # gradual_unfreeze: steps between unfreezes

    def layer_lr(self, layer: str) -> float:
        return self.lr * self.cfg.layerwise_lr_decay ** self.layout.depth(layer)

    @property
    def bottom_frozen(self) -> bool:
        """Embeddings and the bottom blocks are frozen, and stay so: their outputs can be cached."""
        frozen_embeddings = self.cfg.name == "linear_probe" or self.cfg.freeze_embeddings
        return self.cfg.name in ("freeze", "linear_probe") and frozen_embeddings and self.frozen_blocks > 0


def apply_strategy(model: nn.Module, cfg: Config, steps_per_epoch: int, lr: float) -> tuple[nn.Module, Plan]:
    """Freeze (or wrap with LoRA) as the config says; returns the model to train and the plan.
    `lr` is the peak learning rate of the head (train.lr, resolved when it is auto)."""
    scfg = cfg.strategy
    layout = find_layout(model)
    plan = Plan(scfg, lr, cfg.train.weight_decay, layout)
    if scfg.name == "full" and scfg.layerwise_lr_decay == 1.0:
        return model, plan
    if layout is None:
        raise TunesmithError(f"strategy.name: '{scfg.name}' needs the model's transformer blocks, and "
                             f"{type(model).__name__} has no block list")
    if scfg.name == "lora":
        return _wrap_lora(model, scfg, layout), plan
    if not layout.params(model, HEAD) and scfg.name in ("linear_probe", "gradual_unfreeze"):
        raise TunesmithError(f"strategy.name: '{scfg.name}' needs a task head, and {type(model).__name__} has none")
    frozen: set[str] = set()
    if scfg.name == "freeze":
        plan.frozen_blocks = frozen_block_count(scfg.freeze_layers, layout.num_blocks)
        frozen = {f"layer.{i}" for i in range(plan.frozen_blocks)} | ({EMBEDDINGS} if scfg.freeze_embeddings else set())
    elif scfg.name in ("linear_probe", "gradual_unfreeze"):
        plan.frozen_blocks = layout.num_blocks
        frozen = {f"layer.{i}" for i in range(layout.num_blocks)} | {EMBEDDINGS}
    if scfg.name == "gradual_unfreeze":
        plan.pending = [f"layer.{i}" for i in reversed(range(layout.num_blocks))]
        plan.pending += [] if scfg.freeze_embeddings else [EMBEDDINGS]
        epochs = scfg.unfreeze_every_epochs or scfg.DEFAULT_UNFREEZE_EVERY_EPOCHS
        plan.every_steps = scfg.unfreeze_every_steps or max(1, round(epochs * steps_per_epoch))
    for name, param in model.named_parameters():
        if layout.layer_of[name] in frozen:
            param.requires_grad_(False)
    return model, plan


def optimizer_groups(model: nn.Module, plan: Plan) -> list[dict]:
    """AdamW parameter groups: one decay/no-decay pair per trainable layer, head first, each at its LR."""
    if plan.layout is None or plan.cfg.name == "lora":
        return parameter_groups(model, plan.weight_decay, plan.lr)
    layers = [HEAD] + [f"layer.{i}" for i in reversed(range(plan.layout.num_blocks))] + [EMBEDDINGS]
    return [group for layer in layers
            for group in parameter_groups(plan.layout.params(model, layer), plan.weight_decay,
                                          plan.layer_lr(layer), name=layer)]


def describe_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """One entry per layer: its base LR and parameter count (decay and no-decay halves together)."""
    out: dict[str, dict] = {}
    for group in optimizer.param_groups:
        layer = group["name"].rpartition("/")[0] or "all"
        entry = out.setdefault(layer, {"name": layer, "lr": group.get("initial_lr", group["lr"]), "parameters": 0})
        entry["parameters"] += sum(p.numel() for p in group["params"])
    return list(out.values())


def unfreeze_due(plan: Plan, step: int) -> list[str]:
    """Layers that gradual unfreezing opens after optimizer step `step` (one every `every_steps`)."""
    if not plan.pending or not plan.every_steps:
        return []
    total_open = plan.layout.num_blocks + (0 if plan.cfg.freeze_embeddings else 1)
    opened = total_open - len(plan.pending)
    return plan.pending[:max(0, min(total_open, step // plan.every_steps) - opened)]


def unfreeze(plan: Plan, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, layer: str) -> float:
    """Make `layer` trainable and add it to the optimizer at its own LR; returns that LR.

    The LambdaLR scheduler keeps one base LR and one lambda per group, so both get the new group
    too; its current LR is the base LR times the schedule's factor at this step.
    """
    plan.pending.remove(layer)
    params = plan.layout.params(model, layer)
    for _, param in params:
        param.requires_grad_(True)
    lr = plan.layer_lr(layer)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in parameter_groups(params, plan.weight_decay, lr, name=layer):
        group["initial_lr"] = lr
        group["lr"] = lr * factor
        optimizer.add_param_group(group)
        scheduler.base_lrs.append(lr)
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        scheduler._last_lr.append(group["lr"])
    return lr


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except frozen modules stay in eval mode (no dropout, fixed norm statistics)."""
    model.train()
    for module in _frozen_subtrees(model):
        module.eval()


def _frozen_subtrees(module: nn.Module):
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        yield module
        return
    for child in module.children():
        yield from _frozen_subtrees(child)


# ---------------------------------------------------------------- LoRA (peft)

def _head_modules(model: nn.Module, layout: Layout) -> list[str]:
    """Names of the modules holding head parameters (e.g. 'classifier', 'pooler'), for peft."""
    base = getattr(model, "base_model", model)
    base_prefix = next(name for name, m in model.named_modules() if m is base)
    names = []
    for param_name, layer in layout.layer_of.items():
        if layer == HEAD:
            inside = base_prefix and param_name.startswith(base_prefix + ".")
            parts = param_name.split(".")
            name = parts[1] if inside else parts[0]
            if name not in names:
                names.append(name)
    return names


def _wrap_lora(model: nn.Module, scfg: StrategyConfig, layout: Layout) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lcfg = scfg.lora
    linear = sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    if lcfg.target_modules is not None and not set(lcfg.target_modules) & set(linear):
        raise TunesmithError(f"strategy.lora.target_modules: none of {', '.join(lcfg.target_modules)} is a module of "
                             f"this {model.config.model_type} model (its linear layers: {', '.join(linear)})")
    config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                        target_modules=lcfg.target_modules, modules_to_save=_head_modules(model, layout))
    try:
        with warnings.catch_warnings():  # peft calls transformers APIs that warn about their v6 renames
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as exc:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        first = str(exc).strip().splitlines()[0]
        raise TunesmithError(f"strategy.lora.target_modules: {first} (model type '{model_type}'; "
                             "name the attention projections, e.g. [query, value] for BERT)") from None


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_weights(model: nn.Module, folder: Path, cfg: Config) -> None:
    """save_pretrained; a LoRA model is merged first (a plain folder) unless lora.save is 'adapter'."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if is_peft(model) and cfg.strategy.lora.save == "merged":
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(folder, safe_serialization=True)


def load_adapter(model_dir: Path, base: nn.Module) -> nn.Module:
    """A base model with the saved adapter (and head) applied and merged, ready for inference."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, model_dir).merge_and_unload()
