"""Task registry. A task is a module with the same small set of functions:

    load_splits(cfg) -> Splits                 read, check and split the data; the label space
    map_words(examples, fn), show_examples(examples)   augmentation rewrites words (tags kept aligned)
    read_examples(path, data_cfg, labels)      one file, checked against a known label space
    build_model(source, labels, cfg)           -> (model, tokenizer) to train
    load_model(folder)                         a saved model, for evaluate/predict
    encode(tokenizer, examples, max_length, stride=None)
                                               -> Encoded(features, lengths, truncated, doc_index...);
                                                  with a stride, long texts become overlapping windows
    merge_windows(logits, encoded, aggregation) one prediction per example from its windows' logits
    collate(features, pad_id, multiple=1)      -> dict of padded tensors
    default_metric(labels), compute_metrics(logits, targets, labels), predictions_frame(...)

Tests parametrize over TASKS, so every task gets the same checks.
"""

from types import ModuleType

from . import text_classification, token_classification

TASKS: dict[str, ModuleType] = {m.NAME: m for m in (text_classification, token_classification)}
