"""The task registry: name -> task module. A task is one module providing every name of
tasks.base.Task, plus one line here; tests parametrize over TASKS, so every task gets the same checks."""

from collections.abc import Iterator, Mapping
from importlib import import_module
from types import ModuleType

# the task modules of this package (each module's NAME is its file name)
_MODULES = ("text_classification", "token_classification", "image_classification", "language_modeling",
            "causal_lm")


class _Registry(Mapping[str, ModuleType]):
    """A task module is imported when it is first asked for: a text run never imports the image task's
    libraries (torchvision, and torch._dynamo under it: about 1.3 s of every start, bench/README.md)."""

    def __getitem__(self, name: str) -> ModuleType:
        if name not in _MODULES:
            raise KeyError(name)
        return import_module(f"{__name__}.{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


TASKS: Mapping[str, ModuleType] = _Registry()
