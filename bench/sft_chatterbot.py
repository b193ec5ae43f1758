"""The real run of task causal_lm: SmolLM2-135M-Instruct (smollm2-135m) fine-tuned on chatterbot-corpus pairs
with configs/chatterbot_sft.yaml, against the base model on the same held-out test pairs (questions never in
training), scored by the same code: loss per answer token, perplexity, exact match and token F1 of greedy
generations (SQuAD normalisation).

    python bench/sft_chatterbot.py [--config configs/chatterbot_sft.yaml] [--rows N] [any --key value]

--rows N keeps N rows of the catalog's validation and test files, evenly spaced (the files run topic by topic),
written beside the run (a shared CPU's budget); every training row is used.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import tunesmith
from tunesmith.cli import _parse_overrides
from tunesmith.config import load_config
from tunesmith.inference import choose_precision, example_outputs
from tunesmith.models import resolve_model
from tunesmith.tasks import causal_lm
from tunesmith.tasks.base import resolve_data_config


def base_metrics(cfg) -> dict:
    """The pretrained model on the test split, exactly as a run's test split is scored."""
    model, processor = causal_lm.build_model(resolve_model(cfg.model.name), causal_lm.LMSpec(), cfg)
    data = resolve_data_config(cfg.data)
    examples = causal_lm.read_examples(data.test, cfg, None)
    enc = causal_lm.encode(processor, examples, cfg)
    precision = choose_precision(cfg.train.precision, parameters=sum(p.numel() for p in model.parameters()))
    outputs, _ = example_outputs(model.eval(), causal_lm, enc, causal_lm.make_collate(processor, 1),
                                 cfg.train.eval_batch_size, torch.device("cpu"), precision)
    return causal_lm.compute_metrics(outputs, examples.targets, causal_lm.LMSpec())


def main() -> None:
    argv = sys.argv[1:]
    config, rows = "configs/chatterbot_sft.yaml", None
    while argv[:1] in (["--config"], ["--rows"]):
        if argv[0] == "--config":
            config = argv[1]
        else:
            rows = int(argv[1])
        argv = argv[2:]
    overrides = _parse_overrides(argv)
    cfg = load_config(config, overrides)
    if rows:
        data = resolve_data_config(cfg.data)
        folder = Path(cfg.output.dir) / "subsets"
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("validation", "test"):
            lines = Path(getattr(data, split)).read_text().splitlines()
            lines = lines[::max(1, len(lines) // rows)][:rows]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
            overrides[f"data.{split}"] = str(folder / f"{split}.jsonl")
        cfg = load_config(config, overrides)
    started = time.perf_counter()
    base = base_metrics(cfg)
    base_seconds = time.perf_counter() - started
    result = tunesmith.train(config, overrides)
    tuned = result.metrics
    print(f"\n{cfg.model.name} on {cfg.data.dataset}: base model scored in {base_seconds:.0f}s; run {result.run_dir}\n")
    print("| model | test loss | perplexity | exact match | token F1 |")
    print("|---|---|---|---|---|")
    for name, m in (("base (no fine-tuning)", base), (f"fine-tuned ({cfg.strategy.name})", tuned)):
        print(f"| {name} | {m['loss']:.4f} | {m['perplexity']:.2f} | {m['exact_match']:.4f} | {m['token_f1']:.4f} |")
    print(f"\nvalidation: {result.validation_metrics and {k: round(v, 4) for k, v in result.validation_metrics.items() if isinstance(v, float)}}")


if __name__ == "__main__":
    main()
