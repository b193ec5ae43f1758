"""tunesmith causal_lm against TRL's SFTTrainer: the same model (smollm2-135m), data (chatterbot train split,
chat template), LoRA (r 8, alpha 16, dropout 0.05, every linear layer of the blocks), max length, batch size,
learning rate and schedule (linear, 10% warm-up), optimizer steps and precision, one side after the other,
each in its own process (so peak RSS is each side's own).

Printed per side: real tokens trained per second (tokens of the examples, no padding: TRL's are counted from
the attention masks its collator makes, tunesmith's from the examples it batches), the final validation loss
(the same function scores both models: the mean loss per answer token over the chatterbot validation split),
and peak RSS. TRL runs with its defaults for everything not named above (packing off: rows padded to the
longest in the batch, no length grouping) except gradient checkpointing, which TRL 1.16 turns on by default
and is turned off here (tunesmith does not recompute activations); tunesmith with its defaults (random
batches, each packed into one row with attention example by example).

    python bench/vs_trl.py [--steps 40] [--batch-size 8] [--max-length 128] [--lr 5e-4] [--val-rows N] [--seeds 0 1]
    python bench/vs_trl.py ... --same-streams
    python bench/vs_trl.py ... --sides tunesmith --tunesmith-order torch

--same-streams takes the randomness out of the comparison: TRL trains on tunesmith's batches of that seed
(the same examples in the same order, tunesmith's token ids and answer targets) from tunesmith's initial
LoRA matrices, so the two runs differ only in their training machinery and dropout masks. tunesmith runs
first and writes both down; TRL's data sampler is sequential over them. --tunesmith-order torch makes tunesmith
draw its batch order the way TRL's sampler does (torch.randperm seeded with the seed; its own is numpy's
permutation): then both libraries train on the same orders of every seed, from their own code otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def validation_loss(model, model_dir: str, args) -> float:
    """Mean loss per answer token over the validation split, by tunesmith's encoder and loss (both sides)."""
    import torch

    from tunesmith import catalog
    from tunesmith.config import load_config
    from tunesmith.inference import example_outputs
    from tunesmith.tasks import causal_lm

    cfg = load_config(_config(args, "unused"))
    _, processor = causal_lm.build_model(model_dir, causal_lm.LMSpec(), cfg)
    examples = causal_lm.read_examples(str(catalog.dataset_path("chatterbot") / "validation.jsonl"), cfg, None)
    examples = examples.subset(list(range(min(args.val_rows, len(examples)))))
    enc = causal_lm.encode(processor, examples, cfg)
    enc.generate = None
    outputs, _ = example_outputs(model.eval(), causal_lm, enc, causal_lm.make_collate(processor, 1), 32,
                                 torch.device("cpu"), args.precision)
    return causal_lm.compute_metrics(outputs, None, causal_lm.LMSpec())["loss"]


def _config(args, out: str) -> dict:
    return {"task": "causal_lm", "model": {"name": "smollm2-135m", "max_length": args.max_length},
            "data": {"dataset": "chatterbot", "test": False},
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.1,
                      "precision": args.precision, "eval_every_steps": args.steps, "seed": args.seed,
                      "checkpoint_every_steps": 10**6},
            "strategy": {"name": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05}},
            "causal_lm": {"eval_generate": False}, "output": {"dir": out, "name": "bench"}}


def run_tunesmith(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import tunesmith
    from tunesmith import loop, strategies

    tokens = [0]
    forward_backward = loop._forward_backward

    def counting(lp, train_enc, indices, *rest):  # real tokens of the examples trained
        tokens[0] += sum(len(train_enc.features[i]["input_ids"]) for i in indices)
        return forward_backward(lp, train_enc, indices, *rest)

    loop._forward_backward = counting
    if args.tunesmith_order == "torch":  # TRL's sampler: torch.randperm with a generator seeded with the seed
        def torch_batches(lengths, batch_size, seed, group_by_length, sample_weights=None):
            order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

        loop.make_batches = torch_batches
    if args.streams:  # write down the first epoch's batches and the initial LoRA matrices for the TRL side
        make_batches, wrap_lora = loop.make_batches, strategies._wrap_lora

        def recording_batches(*a, **k):
            batches = make_batches(*a, **k)
            if not Path(args.streams, "batches.json").exists():
                Path(args.streams, "batches.json").write_text(json.dumps(batches))
            return batches

        def recording_lora(*a, **k):
            model = wrap_lora(*a, **k)
            torch.save({_layer_key(n): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
                       Path(args.streams, "lora_init.pt"))
            return model

        loop.make_batches, strategies._wrap_lora = recording_batches, recording_lora
    with tempfile.TemporaryDirectory() as out:
        result = tunesmith.train(_config(args, out))
        summary = json.loads((result.run_dir / "metrics.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(result.run_dir / "model")
        from tunesmith import catalog
        loss = validation_loss(model, str(catalog.model_path("smollm2-135m")), args)
    return {"seconds": summary["train"]["seconds"], "tokens": tokens[0], "val_loss": loss}


def _layer_key(name: str) -> str:
    """A LoRA parameter's name from its block on (the wrappers above it are named differently)."""
    return name[name.index("layers."):]


def _tunesmith_batches(args, model_dir: str):
    """tunesmith's training examples of this seed in its batch order (--same-streams), as token ids + targets."""
    import datasets

    from tunesmith import catalog
    from tunesmith.config import load_config
    from tunesmith.tasks import causal_lm

    cfg = load_config(_config(args, "unused"))
    _, processor = causal_lm.build_model(model_dir, causal_lm.LMSpec(), cfg)
    examples = causal_lm.read_examples(str(catalog.dataset_path("chatterbot") / "train.jsonl"), cfg, None)
    enc = causal_lm.encode(processor, examples, cfg)
    batches = json.loads(Path(args.streams, "batches.json").read_text())[:args.steps]
    if len(batches) < args.steps:
        raise SystemExit(f"--same-streams: {args.steps} steps are more than one pass ({len(batches)} batches)")
    return datasets.Dataset.from_list([{"input_ids": list(enc.features[i]["input_ids"]),
                                        "labels": list(enc.features[i]["labels"])} for b in batches for i in b])


def run_trl(args) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunesmith import catalog

    model_dir = str(catalog.model_path("smollm2-135m"))
    if args.streams:
        data = _tunesmith_batches(args, model_dir)
    else:
        rows = [json.loads(line) for line in
                (catalog.dataset_path("chatterbot") / "train.jsonl").read_text().splitlines()]
        data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                            "completion": [{"role": "assistant", "content": r["completion"]}]}
                                           for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_length=args.max_length, per_device_train_batch_size=args.batch_size,
                           max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear",
                           warmup_steps=round(0.1 * args.steps), weight_decay=0.01, max_grad_norm=1.0,
                           bf16=args.precision == "bf16", save_strategy="no", report_to="none", seed=args.seed,
                           logging_steps=10, use_cpu=True, dataloader_num_workers=0,
                           gradient_checkpointing=False)  # TRL's default is on: recomputation tunesmith does not do
        peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=peft)
        if args.streams:  # tunesmith's initial LoRA matrices, its batches in order
            initial = torch.load(Path(args.streams, "lora_init.pt"), weights_only=True)
            with torch.no_grad():
                loaded = [p.copy_(initial[_layer_key(n)]) for n, p in trainer.model.named_parameters() if "lora_" in n]
            assert len(loaded) == len(initial), (len(loaded), len(initial))
            trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        batch_tokens = []
        collator = trainer.data_collator

        def counting(features):
            batch = collator(features)
            batch_tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else
                                int(batch["input_ids"].numel()))
            return batch

        trainer.data_collator = counting  # get_train_dataloader reads it when training starts
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        merged = trainer.model.merge_and_unload()
    # the data loader collates one batch ahead: the last one it made (step 81 of 80) is never trained on
    return {"seconds": seconds, "tokens": sum(batch_tokens[:args.steps]),
            "val_loss": validation_loss(merged, model_dir, args)}


def side(args) -> None:
    result = run_trl(args) if args.side == "trl" else run_tunesmith(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--val-rows", type=int, default=10**9, help="score the final loss on the first N validation rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (both sides each)")
    parser.add_argument("--same-streams", action="store_true",
                        help="TRL trains on tunesmith's batches of the seed from its initial LoRA matrices")
    parser.add_argument("--sides", nargs="+", choices=["trl", "tunesmith"], default=["trl", "tunesmith"])
    parser.add_argument("--tunesmith-order", choices=["own", "torch"], default="own",
                        help="torch: tunesmith's side draws its batch order as TRL's sampler does (torch.randperm "
                             "seeded with the seed) instead of with numpy: the same orders as TRL's, to tell the "
                             "libraries apart from their shuffles")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--streams", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["trl", "tunesmith"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision == "auto":
        from tunesmith.inference import choose_precision
        args.precision = choose_precision("auto", parameters=134_515_008)
    if args.side:
        return side(args)
    runs = {"trl": [], "tunesmith": []}
    if args.same_streams and (set(args.sides) != {"trl", "tunesmith"} or args.tunesmith_order != "own"):
        parser.error("--same-streams runs both sides on tunesmith's own order")
    order = ["tunesmith", "trl"] if args.same_streams else ["trl", "tunesmith"]  # streams: tunesmith writes them
    order = [name for name in order if name in args.sides]
    for seed in args.seeds:  # both sides of a seed back to back
        with tempfile.TemporaryDirectory() as streams:
            for name in order:
                with tempfile.NamedTemporaryFile(suffix=".json") as f:
                    cmd = [sys.executable, __file__, "--side", name, "--result", f.name, "--steps", str(args.steps),
                           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                           "--lr", str(args.lr), "--precision", args.precision, "--val-rows", str(args.val_rows),
                           "--seed", str(seed), "--tunesmith-order", args.tunesmith_order] + \
                          (["--streams", streams] if args.same_streams else [])
                    subprocess.run(cmd, check=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
                    runs[name].append(json.loads(Path(f.name).read_text()))
    print(f"\nsmollm2-135m, chatterbot train, LoRA r 8 (all linear layers of the blocks), {args.steps} steps of "
          f"{args.batch_size}, max_length {args.max_length}, lr {args.lr:g}, precision {args.precision}, "
          f"seeds {' '.join(map(str, args.seeds))}{', TRL on tunesmith streams' if args.same_streams else ''}"
          f"{', tunesmith in torch.randperm orders' if args.tunesmith_order == 'torch' else ''}\n")
    print("| side | seed | train s | real tokens | real tokens/s | final val loss | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        for seed, r in zip(args.seeds, results):
            print(f"| {'TRL SFTTrainer' if name == 'trl' else 'tunesmith'} | {seed} | {r['seconds']:.1f} | "
                  f"{r['tokens']} | {r['tokens'] / r['seconds']:.0f} | {r['val_loss']:.4f} | {r['peak_rss_mb']:.0f} |")

    def speed(results):  # tokens over seconds of all seeds together
        return sum(r["tokens"] for r in results) / sum(r["seconds"] for r in results)

    def mean_loss(results):
        return sum(r["val_loss"] for r in results) / len(results)

    t, s = runs["trl"], runs["tunesmith"]
    if not (t and s):
        return
    print(f"\ntunesmith / TRL: tokens/s {speed(s) / speed(t):.2f}x, mean val loss {mean_loss(s):.4f} against "
          f"{mean_loss(t):.4f} ({mean_loss(s) - mean_loss(t):+.4f}), peak RSS "
          f"{max(r['peak_rss_mb'] for r in s) / max(r['peak_rss_mb'] for r in t):.2f}x")

if __name__ == "__main__":
    main()
