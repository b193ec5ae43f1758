"""Model anatomy for the strategies: embeddings, ordered blocks (or stages), head.

A model is seen as layers, bottom to top: `embeddings` (everything below the first block: a text
model's embeddings, a CNN's stem, a ViT's patch embedding and position/class tokens), `layer.0` ...
`layer.{L-1}` (the blocks or stages, bottom to top) and `head` (everything above the last block:
a pooler and classifier, a CNN's last 1x1 convolution, final norm, pooling and classifier).

Each `@register_layout` function looks at a model and returns its Layout, or None when it does not
know it; `find_layout` tries them in order and the first answer wins:

    peft_wrapped      a peft model: the layout of the model inside, under peft's name prefix
    huggingface       the largest ModuleList of the base model; head = outside the base model + pooler
    resnet            layer1 .. layer4 (timm and torchvision ResNet / ResNeXt / Wide ResNet)
    block_list        the children of `blocks` (timm EfficientNet, MobileNet, ViT, DeiT...) or
                      `stages` (timm ConvNeXt, ByobNet, NFNet...)
    vgg               `features` split after each MaxPool2d (timm and torchvision VGG)
    torchvision_features  `features[1:-1]` of torchvision MobileNetV2/V3 and EfficientNet
                      (features[0] is the stem, features[-1] the last 1x1 convolution)

Outside Hugging Face, the head is found by position: timm and torchvision register modules in the
order they run, so what is registered after the last block (in the blocks' container and in each
container above it) is the head, and everything that is neither block nor head is embeddings.

A block is one module (`blocks.3`, `layer2`) or, for VGG, a run of modules in one Sequential
(`features.0` ... `features.2`). Each is addressed by its path, and `Layout.swap` puts another module
at a path (setattr on the owner: an attribute such as `layer2`, or an index such as `3` of a
Sequential/ModuleList, which nn.Module handles alike). features.py replays cached outputs that way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

EMBEDDINGS, HEAD = "embeddings", "head"
LAYOUTS: list[Callable[[nn.Module], "Layout | None"]] = []


def join_path(*parts: str) -> str:
    """join_path("bert", "", "pooler") -> "bert.pooler"."""
    return ".".join(p for p in parts if p)


@dataclass(eq=False)
class Layout:
    """Where the layers of a model are: module paths relative to `root`, and each parameter's layer.

    `swap(path, module)` replaces the module at a path (and returns the old one to put back): how
    features.py stands in for frozen blocks whether they are items of a list (`blocks.3`, a
    ModuleList index) or attributes (`layer3`). A swap was chosen over forward hooks because a hook
    can replace a block's output but cannot skip computing it."""
    root: nn.Module = field(repr=False)
    blocks: list[tuple[str, ...]]   # block i: the paths of its modules, in order (usually one)
    head: list[str]                 # module or parameter paths above the blocks
    family: str                     # "huggingface", "resnet", "timm blocks", "vgg", ...
    block_word: str = "stages"      # what the blocks are called in messages
    layer_of: dict[str, str] = field(init=False)  # parameter name -> "embeddings" | "layer.3" | "head"

    def __post_init__(self):
        owners = [(path + ".", f"layer.{i}") for i, block in enumerate(self.blocks) for path in block]
        owners += [(path + ".", HEAD) for path in self.head]
        self.layer_of = {}
        for name, _ in self.root.named_parameters():
            dotted = name + "."  # "fc.weight." starts with "fc."; a head parameter path "cls" with "cls."
            self.layer_of[name] = next((layer for prefix, layer in owners if dotted.startswith(prefix)), EMBEDDINGS)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def is_huggingface(self) -> bool:
        return self.family == "huggingface"

    def depth(self, layer: str) -> int:
        """Levels below the head: head 0, top block 1, ..., embeddings num_blocks + 1."""
        if layer == HEAD:
            return 0
        if layer == EMBEDDINGS:
            return self.num_blocks + 1
        return self.num_blocks - int(layer.split(".")[1])

    def params(self, model: nn.Module, layer: str) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if self.layer_of.get(n) == layer]

    def module(self, path: str) -> nn.Module:
        return self.root.get_submodule(path)

    def swap(self, path: str, module: nn.Module) -> nn.Module:
        """Put `module` at `path`; returns the module that was there (swap it back to restore)."""
        owner_path, _, name = path.rpartition(".")
        owner = self.root.get_submodule(owner_path)
        old = getattr(owner, name)
        setattr(owner, name, module)
        return old

    def head_modules(self) -> list[str]:
        """Paths of the head's modules that hold parameters (for peft's modules_to_save)."""
        names = dict(self.root.named_modules())
        return [p for p in self.head if p in names and list(names[p].parameters())]


def register_layout(fn: Callable[[nn.Module], Layout | None]) -> Callable[[nn.Module], Layout | None]:
    LAYOUTS.append(fn)
    return fn


def find_layout(model: nn.Module) -> Layout | None:
    """The layout of the first registered family that recognises the model; None when none does."""
    for fn in LAYOUTS:
        layout = fn(model)
        if layout is not None:
            return layout
    return None


def is_peft(model: nn.Module) -> bool:
    """Without importing peft: a peft model exists only once peft has been imported, and importing it
    (with the transformers generation code it pulls in) took 2.47 CPU seconds of every run (bench/README.md)."""
    peft = sys.modules.get("peft")
    peft_model = getattr(peft, "PeftModel", None)
    return peft_model is not None and isinstance(model, peft_model)


def _after(model: nn.Module, path: str) -> list[str]:
    """Modules registered after `path` in its container and in every container above, in run order."""
    out = []
    while path:
        owner, _, name = path.rpartition(".")
        siblings = [n for n, _ in model.get_submodule(owner).named_children()]
        out += [join_path(owner, n) for n in siblings[siblings.index(name) + 1:]]
        path = owner
    return out


def _by_position(model: nn.Module, blocks: list[tuple[str, ...]], family: str, block_word: str = "stages") -> Layout:
    return Layout(model, blocks, _after(model, blocks[-1][-1]), family, block_word)


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module peft wrapped, if it did: a LoRA layer's base_layer, a modules_to_save wrapper's original."""
    for attr in ("base_layer", "original_module"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return module


def _children(model: nn.Module, path: str) -> list[tuple[str, ...]]:
    """One block per child of the Sequential/ModuleList at `path` ([] when there is none)."""
    try:
        container = model.get_submodule(path)
    except AttributeError:
        return []
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        return []
    return [(join_path(path, name),) for name, _ in container.named_children()]


# ---------------------------------------------------------------- the registry, tried in this order

@register_layout
def peft_wrapped(model: nn.Module) -> Layout | None:
    """A peft model: the wrapped model's layout; peft names its parameters base_model.model.<name>
    (LoRA weights and modules_to_save copies sit under the module they adapt, so they keep its layer)."""
    if not is_peft(model):
        return None
    inner = find_layout(model.base_model.model)
    if inner is None:
        return None
    prefix = "base_model.model."
    return Layout(model, [tuple(prefix + p for p in block) for block in inner.blocks],
                  [prefix + p for p in inner.head], inner.family, inner.block_word)


@register_layout
def huggingface(model: nn.Module) -> Layout | None:
    """Blocks: the largest ModuleList in the base model (BERT, RoBERTa, MPNet, DistilBERT, ELECTRA,
    Llama...). Head: everything outside the base model, plus the base model's pooler."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    base = model.base_model
    base_prefix = next(name for name, m in model.named_modules() if m is base)
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return None
    list_name, _ = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    blocks = _children(model, join_path(base_prefix, list_name))
    head = [join_path(base_prefix, n) for n, _ in base.named_children() if "pooler" in n]
    if base is not model:  # a task model: what it adds around the base model (classifier...) is head
        head += [n for n, m in model.named_children() if m is not base]
        head += [n for n, _ in model.named_parameters(recurse=False)]
    return Layout(model, blocks, head, "huggingface", "transformer blocks")


@register_layout
def resnet(model: nn.Module) -> Layout | None:
    """ResNet-style stages as attributes layer1..layer4 (timm and torchvision); stem conv1/bn1/maxpool."""
    names = ("layer1", "layer2", "layer3", "layer4")
    if not all(isinstance(getattr(model, n, None), nn.Module) for n in names):
        return None
    return _by_position(model, [(n,) for n in names], "resnet")


@register_layout
def block_list(model: nn.Module) -> Layout | None:
    """timm models with a `blocks` Sequential (EfficientNet, MobileNet: stages; ViT, DeiT: transformer
    blocks) or a `stages` Sequential (ConvNeXt, ByobNet, NFNet...)."""
    for path, word in (("blocks", "blocks"), ("stages", "stages")):
        blocks = _children(model, path)
        if blocks:
            return _by_position(model, blocks, f"timm {path}", word)
    return None


@register_layout
def vgg(model: nn.Module) -> Layout | None:
    """VGG (timm and torchvision): `features` is a flat Sequential of conv/ReLU(/BN)/MaxPool layers;
    each stage ends at a MaxPool2d. There is no stem (no embeddings)."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not any(isinstance(m, nn.MaxPool2d) for m in features):
        return None
    plain = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)  # not DenseNet's features, say
    if not all(isinstance(_unwrapped(m), plain) for m in features):
        return None
    blocks, current = [], []
    for name, module in features.named_children():
        current.append(f"features.{name}")
        if isinstance(module, nn.MaxPool2d):
            blocks.append(tuple(current))
            current = []
    blocks += [tuple(current)] if current else []
    return _by_position(model, blocks, "vgg")


@register_layout
def torchvision_features(model: nn.Module) -> Layout | None:
    """torchvision MobileNetV2/V3 and EfficientNet: features[0] (a Conv2dNormActivation) is the stem,
    features[-1] (another: the 1x1 conv to the classifier's width), avgpool and classifier the head.
    In between, a block that keeps its input's width and resolution joins the stage before it, so
    the stages are timm's (MobileNetV2: 17 blocks in 7 stages; EfficientNet's features[i] are stages)."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or len(features) < 3:
        return None
    if not all(type(_unwrapped(features[i])).__name__ == "Conv2dNormActivation" for i in (0, -1)):
        return None
    stages: list[tuple[str, ...]] = []
    width = None
    for i in range(1, len(features) - 1):
        convs = [m for m in features[i].modules() if isinstance(m, nn.Conv2d)]
        downsamples = any(c.stride != (1, 1) for c in convs)
        if stages and convs[-1].out_channels == width and not downsamples:
            stages[-1] += (f"features.{i}",)
        else:
            stages.append((f"features.{i}",))
        width = convs[-1].out_channels
    return _by_position(model, stages, "torchvision features")
