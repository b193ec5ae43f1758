"""Where a training step's time goes: tunesmith's loop pieces on minilm-l6 + Rotten Tomatoes.

    .venv/bin/python bench/profile_step.py [--steps 20] [--precision fp32|bf16] [--ab-first-token 3]
                                           [--ab-fast-dropout 1] [--ab-bf16-weights 2] [--ab-no-dropout 2]

Times each phase of the step (collate, forward, backward, clip, optimizer step) with wall clocks over
--steps length-grouped batches of 32, then prints the top operators from torch.profiler. With
--ab-first-token R, it then times the same steps with Hugging Face's whole last block and with
tunesmith's first-token-only one (models.first_token_only), R rounds over the same batches: each
batch's step runs under both settings back to back, in alternating order, so the host's changes of
speed (large on a shared machine) fall on both alike. --ab-fast-dropout R does the same for torch's
dropout masks against tunesmith's cheaper ones (dropout.use_fast_dropout, what training on a CPU uses).
--ab-bf16-weights R (with --precision bf16): bf16 autocast on fp32 weights (what tunesmith does) against a bf16
model with fp32 master weights in the optimizer (no casts in the step; bf16_weights_step).
--ab-no-dropout R: the model's dropout (0.1, tunesmith's cheaper masks) against none (`train.dropout: 0`, what
`dropout: auto` gives a plan of at most two passes: the attention then runs in SDPA's own kernel).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from tunesmith import catalog
from tunesmith.config import load_config
from tunesmith.dropout import use_fast_dropout
from tunesmith.models import first_token_only, parameter_groups, set_dropout
from tunesmith.tasks import text_classification as tc
from tunesmith.loop import FUSED_ADAMW_DEVICES, make_batches


def minilm_training_setup(n_batches: int):
    """minilm-l6 built as train.py builds it (in train mode, with the cheaper dropout masks of a CPU run), the
    Rotten Tomatoes train split encoded at max_length 128, its first n_batches length-grouped batches of 32, and
    the AdamW train.py uses."""
    torch.manual_seed(0)
    cfg = load_config({"data": {"dataset": "rotten_tomatoes", "validation_fraction": 0}})
    df = pd.read_csv(catalog.dataset_path("rotten_tomatoes") / "train.csv")
    labels = tc.LabelSpace("single_label", sorted(set(df["label"])))
    model, tok = tc.build_model(str(catalog.model_path("minilm-l6")), labels, cfg)
    enc = tc.encode(tok, tc.load_splits(cfg).train, cfg)  # model.max_length 128, as in training
    batches = make_batches(enc.lengths, 32, 0, True)[:n_batches]
    opt = torch.optim.AdamW(parameter_groups(model, 0.01), lr=5e-5, fused="cpu" in FUSED_ADAMW_DEVICES)
    use_fast_dropout(model)  # as loop.py does on a CPU
    model.train()
    return model, tok, enc, batches, opt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--ab-first-token", type=int, default=0, metavar="ROUNDS",
                        help="also time whole vs first-token-only last block, step by step, ROUNDS rounds")
    parser.add_argument("--ab-fast-dropout", type=int, default=0, metavar="ROUNDS",
                        help="also time torch's vs tunesmith's dropout masks, step by step, ROUNDS rounds")
    parser.add_argument("--ab-bf16-weights", type=int, default=0, metavar="ROUNDS",
                        help="with --precision bf16: also time bf16 autocast on fp32 weights (tunesmith) against a bf16 "
                             "copy of the model with fp32 master weights in the optimizer, step by step, ROUNDS rounds")
    parser.add_argument("--ab-no-dropout", type=int, default=0, metavar="ROUNDS",
                        help="also time the model's dropout against none, step by step, ROUNDS rounds")
    args = parser.parse_args()
    if args.ab_bf16_weights and args.precision != "bf16":
        parser.error("--ab-bf16-weights compares two ways of training in bf16: give --precision bf16")

    model, tok, enc, batches, opt = minilm_training_setup(args.steps + 3)
    phases = {k: 0.0 for k in ("collate", "forward", "backward", "clip", "optimizer")}
    ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")  # noqa: E731

    def step(b, timed: bool):
        t0 = time.perf_counter()
        batch = tc.make_collate(tok, 1)([enc.features[i] for i in b])
        t1 = time.perf_counter()
        with ctx():
            loss = model(**batch).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if timed:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k] += dt

    for b in batches[:3]:
        step(b, False)
    for b in batches[3:]:
        step(b, True)
    total = sum(phases.values())
    tokens = sum(enc.lengths[i] for b in batches[3:] for i in b)
    padded = sum(max(enc.lengths[i] for i in b) * len(b) for b in batches[3:])
    print(f"{args.steps} steps, {total / args.steps * 1000:.0f} ms/step, {32 * args.steps / total:.1f} samples/s, "
          f"padding {1 - tokens / padded:.1%} of the padded tokens ({args.precision})")
    print("| phase | ms/step | share |\n|---|---|---|")
    for k, v in phases.items():
        print(f"| {k} | {v / args.steps * 1000:.1f} | {v / total:.1%} |")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[3:8]:
            step(b, False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    print(f"embedding parameters: {emb:,} of {sum(p.numel() for p in model.parameters()):,}")

    if args.ab_first_token:
        last = model.base_model.encoder.layer[-1]
        interleaved(args.ab_first_token, {"whole last block": lambda: last.__dict__.pop("forward", None),
                                          "first token only": lambda: first_token_only(model)},
                    step, batches[3:], args.steps)
    if args.ab_fast_dropout:
        dropouts = [m for m in model.modules() if type(m) is torch.nn.Dropout]

        def torch_dropout():
            for m in dropouts:
                m.__dict__.pop("forward", None)
            model.set_attn_implementation("sdpa")

        interleaved(args.ab_fast_dropout, {"torch's dropout masks": torch_dropout,
                                           "tunesmith's dropout masks": lambda: use_fast_dropout(model)},
                    step, batches[3:], args.steps)
    if args.ab_no_dropout:
        interleaved(args.ab_no_dropout, {"dropout 0.1": lambda: set_dropout(model, 0.1),
                                         "no dropout": lambda: set_dropout(model, 0.0)},
                    step, batches[3:], args.steps)
    if args.ab_bf16_weights:
        bf16_step = bf16_weights_step(model, tok, enc)
        mode = {"bf16 weights": False}
        interleaved(args.ab_bf16_weights, {"bf16 autocast, fp32 weights": lambda: mode.update({"bf16 weights": False}),
                                           "bf16 weights, fp32 masters": lambda: mode.update({"bf16 weights": True})},
                    lambda b, timed: bf16_step(b) if mode["bf16 weights"] else step(b, timed), batches[3:], args.steps)


def bf16_weights_step(model, tok, enc):
    """A step of "O2" mixed precision: a bf16 copy of the model runs forward and backward without autocast (no
    casts of weights or activations), its gradients go to fp32 master weights, which the fused AdamW updates and
    which are copied back into the bf16 model. Its own copy of the model: the fp32 one keeps training as before."""
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    use_fast_dropout(model16)
    model16.train()
    params16 = list(model16.parameters())
    masters = [p.detach().float().requires_grad_(True) for p in params16]
    named = dict(zip([n for n, _ in model16.named_parameters()], masters))
    opt = torch.optim.AdamW(parameter_groups(named.items(), 0.01), lr=5e-5, fused="cpu" in FUSED_ADAMW_DEVICES)
    collate = tc.make_collate(tok, 1)

    def step(b):
        batch = collate([enc.features[i] for i in b])
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model16(**batch).logits.float(), labels)
        loss.backward()
        for master, p in zip(masters, params16):
            master.grad, p.grad = p.grad.float(), None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(params16, masters)
    return step


def interleaved(rounds: int, settings: dict, step, batches: list, steps: int) -> None:
    """Every batch's step runs under both settings, one right after the other, in alternating order: the host's
    drifts in speed hit both alike. Prints ms/step of each and the second's speed-up over the first."""
    totals, ratios = dict.fromkeys(settings, 0.0), []
    before, after = settings
    for r in range(rounds):
        for i, b in enumerate(batches):
            took = {}
            for name in list(settings)[::1 if (i + r) % 2 == 0 else -1]:
                settings[name]()
                t = time.perf_counter()
                step(b, False)
                took[name] = time.perf_counter() - t
                totals[name] += took[name]
            ratios.append(took[before] / took[after])
    n = rounds * steps
    low, median, high = statistics.quantiles(ratios, n=4)
    print(f"{before}: {totals[before] / n * 1000:.0f} ms/step; {after}: {totals[after] / n * 1000:.0f} ms/step "
          f"({n} steps each, interleaved)\n{after}: {totals[before] / totals[after]:.2f}x the steps per second of "
          f"{before} (per step: median {median:.2f}x, quartiles {low:.2f}-{high:.2f}x)")


if __name__ == "__main__":
    main()
