"""The task registry: name -> task module. A task is one module providing every name of
tasks.base.Task, plus one line here; tests parametrize over TASKS, so every task gets the same checks."""

from types import ModuleType

from . import causal_lm, image_classification, language_modeling, text_classification, token_classification

TASKS: dict[str, ModuleType] = {m.NAME: m for m in (text_classification, token_classification, image_classification,
                                                    language_modeling, causal_lm)}
