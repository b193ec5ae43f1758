"""Fine-tuning strategies: which parameters learn, at what learning rate, and when.

A model is seen as layers, bottom to top (layouts.py finds them in Hugging Face, timm and
torchvision models): `embeddings` (below the first block: text embeddings, a CNN's stem, a ViT's
patch embedding), `layer.0` ... `layer.{L-1}` (transformer blocks or CNN stages) and `head`
(above the last block: pooler, final norm or 1x1 convolution, pooling, classifier).

    full              everything learns
    freeze            embeddings and/or the bottom blocks stay fixed
    linear_probe      only the head learns
    gradual_unfreeze  the head first, then one more layer from the top every K epochs/steps
    lora              peft low-rank adapters; the head learns in full

`layerwise_lr_decay` gives layer d levels below the head the rate lr * decay**d
(head 0, top block 1, ..., embeddings L+1). Frozen modules run in eval mode, so their dropout is
off and normalisation statistics (BatchNorm's running mean and variance) do not move -- which
also makes their outputs cacheable (features.py).
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
from .layouts import EMBEDDINGS, HEAD, Layout, find_layout, is_peft, join_path
from .models import parameter_groups


def frozen_block_count(freeze_layers: int | float, num_blocks: int, word: str = "transformer blocks") -> int:
    """freeze_layers (count, fraction, or negative = from the top) -> blocks frozen from the bottom."""
    if isinstance(freeze_layers, float) and not freeze_layers.is_integer():
        count = round(abs(freeze_layers) * num_blocks)
    else:
        count = abs(int(freeze_layers))
        if count > num_blocks:
            raise TunesmithError(f"strategy.freeze_layers: {freeze_layers} is out of range: "
                                 f"the model has {num_blocks} {word}")
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
        raise TunesmithError(f"strategy.name: '{scfg.name}' needs the model's blocks, and {type(model).__name__} "
                             "has no block list tunesmith knows (Hugging Face, timm and torchvision models do)")
    if scfg.name == "lora":
        return _wrap_lora(model, scfg, layout), plan
    if not layout.params(model, HEAD) and scfg.name in ("linear_probe", "gradual_unfreeze"):
        raise TunesmithError(f"strategy.name: '{scfg.name}' needs a task head, and {type(model).__name__} has none")
    frozen: set[str] = set()
    if scfg.name == "freeze":
        plan.frozen_blocks = frozen_block_count(scfg.freeze_layers, layout.num_blocks, layout.block_word)
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

def default_lora_targets(layout: Layout, language_model: bool = False) -> list[str] | None:
    """LoRA target modules when strategy.lora.target_modules is null. Hugging Face: None (peft's own
    default per model type, e.g. query/value for BERT). timm/torchvision: every nn.Linear and every
    non-grouped nn.Conv2d inside the blocks, by full path (a ViT's attn.qkv, attn.proj, mlp.fc1,
    mlp.fc2; a CNN's 1x1 and 3x3 convolutions). Depthwise convolutions are left out: peft cannot
    merge LoRA into a convolution with groups > 1. In MobileNet/EfficientNet that leaves the 1x1
    ones; in ResNet and VGG, which have (almost) no 1x1 convolutions, the 3x3 ones.
    Measured (pretrained EfficientNet-Lite0, 1,000 Fashion-MNIST images at 64 px, 120 steps of 32,
    r=8, CPU): 0.59M trainable, test accuracy 0.79-0.82, vs 0.78 for linear_probe and 0.64 for
    full fine-tuning (lr 3e-4); a step costs about as much as a full fine-tuning step.
    A Hugging Face language model (`language_model`: its head is its output embeddings) gets every
    linear layer of the blocks too (Llama: q/k/v/o_proj, gate/up/down_proj), as QLoRA-style recipes do."""
    if layout.is_huggingface and not language_model:
        return None
    return [join_path(path, name) for block in layout.blocks for path in block
            for name, m in layout.module(path).named_modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]


def _check_targets(model: nn.Module, layout: Layout, targets: list[str] | None) -> None:
    """At least one target must name a module as peft matches them: its full path or its last parts."""
    kinds = (nn.Linear,) if layout.is_huggingface else (nn.Linear, nn.Conv2d)
    paths = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    if targets is None or any(p == t or p.endswith("." + t) for p in paths for t in targets):
        return
    names = sorted({p.rpartition(".")[2] for p in paths})
    what = f"{model.config.model_type} model (its linear layers" if layout.is_huggingface else \
        f"{type(model).__name__} model (its linear and convolution layers"
    raise TunesmithError(f"strategy.lora.target_modules: none of {', '.join(targets)} is a module of "
                         f"this {what}: {', '.join(names)})")


def _wrap_lora(model: nn.Module, scfg: StrategyConfig, layout: Layout) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lcfg = scfg.lora
    _check_targets(model, layout, lcfg.target_modules)
    lm_heads = output_embedding_paths(model)
    targets = lcfg.target_modules if lcfg.target_modules is not None else \
        default_lora_targets(layout, language_model=bool(lm_heads))
    head = [p for p in layout.head_modules() if p not in lm_heads]
    config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                        target_modules=targets, modules_to_save=head or None)
    try:
        with warnings.catch_warnings():  # peft calls transformers APIs that warn about their v6 renames
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        hint = (f"model type '{getattr(model.config, 'model_type', '?')}'; name the attention projections, "
                "e.g. [query, value] for BERT") if layout.is_huggingface else type(model).__name__
        raise TunesmithError(f"strategy.lora.target_modules: {first} ({hint})") from None
    _freeze_copies_outside_head(wrapped, head)
    return wrapped


def output_embedding_paths(model: nn.Module) -> set[str]:
    """Paths of a language model's output embeddings (lm_head): a pretrained head, often tied to the input
    embeddings, so LoRA leaves it frozen instead of training a full copy (SmolLM2: 28M of 134.5M weights)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, m in model.named_modules() if m is head} if head is not None else set()


def _freeze_copies_outside_head(model: nn.Module, head: list[str]) -> None:
    """peft picks modules_to_save by name suffix, so a head module named 'bn2' (timm EfficientNet)
    also wraps every block's 'bn2'. Those extra copies start equal to the original and stay frozen,
    so they change nothing: not the merged weights, and not an adapter loaded back."""
    from peft.utils import ModulesToSaveWrapper

    prefix = "base_model.model."
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name.removeprefix(prefix) not in head:
            module.requires_grad_(False)


def save_weights(model: nn.Module, folder: Path, cfg: Config, state_dict: dict | None = None) -> None:
    """The trained weights into `folder`. A LoRA model is merged first (a plain model) unless
    lora.save is 'adapter' (peft's adapter folder). Hugging Face models: save_pretrained; timm and
    torchvision models (no save_pretrained): `model.safetensors`, their state_dict, which loads
    into a fresh model of the same architecture (safetensors.torch.load_model). state_dict: the whole
    weights of a sharded (FSDP) model, written in place of its own (LoRA is not sharded: fsdp.py)."""
    from safetensors.torch import save_file

    from .fsdp import unshared

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if is_peft(model) and cfg.strategy.lora.save == "merged":
            model = copy.deepcopy(model).merge_and_unload()
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(folder, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
        else:
            Path(folder).mkdir(parents=True, exist_ok=True)
            weights = unshared(model.state_dict() if state_dict is None else state_dict)  # tied weights once
            # contiguous, as safetensors' save_model makes them: a channels_last model's conv weights are not
            save_file({k: v.contiguous() for k, v in weights.items()}, str(Path(folder) / "model.safetensors"),
                      metadata={"format": "pt"})


def load_adapter(model_dir: Path, base: nn.Module) -> nn.Module:
    """A base model with the saved adapter (and head) applied and merged, ready for inference."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, model_dir).merge_and_unload()
