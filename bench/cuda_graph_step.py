"""Can CUDA graphs take the kernel-launch overhead out of a MiniLM training step? (go/no-go on a GPU)

    .venv/bin/python bench/cuda_graph_step.py [--steps 60] [--compile]

On a GPU, a MiniLM-L6 step at batch 32 spends more wall time launching kernels than running them
(bench/README.md, H200 section). This script measures, on MiniLM-L6's shape (random weights: speed does
not depend on them), batch 32, fp32, widths drawn from the x16 buckets 16..128 in random order:

  eager    forward + backward + clip + fused AdamW: tunesmith's GPU step today
  graphed  the same step, forward and backward replayed from one CUDA graph per width bucket
           (torch.cuda.make_graphed_callables, one shared memory pool); loss, clip and AdamW outside
  compile  (--compile) torch.compile(mode="reduce-overhead", dynamic=False) of the forward; its
           compile time is printed separately because on a one-epoch run it is part of the bill

It first checks the graphed step computes what the eager one does (dropout off, same batch: loss and
gradient norm agree to 1e-4 relative), then prints median ms per step, one-off capture time and peak
GPU memory for each. Without a GPU it runs the one check that needs none: torch._dynamo must trace
forward + loss as a single graph (no graph breaks, so no host synchronisation inside the step, which
CUDA graph capture would refuse), and times the eager step for reference.
"""

from __future__ import annotations

import argparse
import inspect
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "num_labels": 2}
BATCH, BUCKET = 32, 16


class Logits(torch.nn.Module):
    """Tensors in, tensor out: the shape make_graphed_callables needs (one wrapper per width)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def make_model(device: torch.device, dropout: bool = True) -> BertForSequenceClassification:
    torch.manual_seed(0)
    extra = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return BertForSequenceClassification(BertConfig(**MINILM, **extra)).to(device).train()


def make_batch(width: int, device: torch.device, generator: torch.Generator):
    ids = torch.randint(1000, 30000, (BATCH, width), generator=generator).to(device)
    mask = torch.ones_like(ids)
    mask[: BATCH // 2, width - BUCKET // 2:] = 0  # the rounding to x16 leaves some padding, as in real batches
    labels = torch.randint(0, 2, (BATCH,), generator=generator).to(device)
    return ids, mask, labels


def graph_per_width(model: torch.nn.Module, widths: list[int], device: torch.device) -> tuple[dict, float]:
    """One graphed forward/backward per width bucket, all in one memory pool; returns them and the capture time."""
    # torch releases before make_graphed_callables(pool=...) give each width its own pool (more memory)
    shared = {"pool": torch.cuda.graph_pool_handle()} \
        if "pool" in inspect.signature(torch.cuda.make_graphed_callables).parameters else {}
    generator = torch.Generator().manual_seed(1)
    graphed, started = {}, time.perf_counter()
    for width in widths:
        ids, mask, _ = make_batch(width, device, generator)
        graphed[width] = torch.cuda.make_graphed_callables(Logits(model), (ids, mask), **shared)
    torch.cuda.synchronize()
    return graphed, time.perf_counter() - started


def train_step(forward, model, optimizer, ids, mask, labels) -> torch.Tensor:
    loss = F.cross_entropy(forward(ids, mask), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_steps(forward_for, model, optimizer, widths, device) -> float:
    generator = torch.Generator().manual_seed(2)
    batches = [make_batch(w, device, generator) for w in widths]
    times = []
    for i, (ids, mask, labels) in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(forward_for(ids.shape[1]), model, optimizer, ids, mask, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times))


def check_same_math(device: torch.device, buckets: list[int]) -> str:
    """Dropout off, same weights, same batch: graphed and eager give the same loss and gradient norm."""
    eager_model, graphed_model = make_model(device, dropout=False), make_model(device, dropout=False)
    graphed, _ = graph_per_width(graphed_model, buckets, device)
    width = buckets[len(buckets) // 2]
    ids, mask, labels = make_batch(width, device, torch.Generator().manual_seed(3))
    results = []
    for model, forward in ((eager_model, Logits(eager_model)), (graphed_model, graphed[width])):
        loss = F.cross_entropy(forward(ids, mask), labels)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        results.append((loss.item(), norm.item()))
    (loss_e, norm_e), (loss_g, norm_g) = results
    ok = abs(loss_e - loss_g) <= 1e-4 * abs(loss_e) and abs(norm_e - norm_g) <= 1e-4 * abs(norm_e)
    return (f"same math: loss eager {loss_e:.6f} graphed {loss_g:.6f}, grad norm eager {norm_e:.6f} "
            f"graphed {norm_g:.6f} -> {'OK' if ok else 'DIFFERENT'}")


def no_graph_breaks() -> str:
    model = make_model(torch.device("cpu"))
    ids, mask, labels = make_batch(32, torch.device("cpu"), torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(lambda i, m, y: F.cross_entropy(model(input_ids=i, attention_mask=m).logits, y))(
        ids, mask, labels)
    reasons = "; ".join(r.reason[:120] for r in explained.break_reasons[:3])
    return f"dynamo: forward + loss traced as {explained.graph_count} graph(s), {explained.graph_break_count} " \
           f"graph break(s){': ' + reasons if reasons else ' (nothing in the step needs the host)'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--compile", action="store_true", help="also torch.compile(mode='reduce-overhead')")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    buckets = list(range(BUCKET, 128 + 1, BUCKET))
    widths = [int(w) for w in np.random.default_rng(0).choice(buckets, size=args.steps + 5)]
    print(no_graph_breaks())
    rows = []

    model = make_model(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=device.type == "cuda")
    eager = Logits(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows.append(("eager", time_steps(lambda w: eager, model, optimizer, widths, device), 0.0))
    if device.type != "cuda":
        print(f"no GPU: eager step {rows[0][1]:.1f} ms (batch {BATCH}, fp32); CUDA graphs need a GPU")
        return
    peaks = [torch.cuda.max_memory_allocated() / 2**20]
    print(check_same_math(device, buckets))

    for name in ("graphed", "compile") if args.compile else ("graphed",):
        del model, optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = make_model(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
        if name == "graphed":
            graphed, setup = graph_per_width(model, buckets, device)
            forward_for = graphed.__getitem__
        else:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(buckets))
            compiled = torch.compile(Logits(model), mode="reduce-overhead", dynamic=False)
            started, generator = time.perf_counter(), torch.Generator().manual_seed(1)
            for width in buckets:  # compile every bucket up front, so the timed steps never recompile
                ids, mask, labels = make_batch(width, device, generator)
                for _ in range(3):
                    F.cross_entropy(compiled(ids, mask), labels).backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            setup, forward_for = time.perf_counter() - started, (lambda w, c=compiled: c)
        rows.append((name, time_steps(forward_for, model, optimizer, widths, device), setup))
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; MiniLM-L6 shape, batch {BATCH}, fp32, "
          f"{args.steps} timed steps over widths {buckets}\n")
    print("| step | median ms/step | samples/s | x eager | one-off setup s | peak GPU MB |\n|---|---|---|---|---|---|")
    for (name, ms, setup), peak in zip(rows, peaks):
        print(f"| {name} | {ms:.2f} | {1000 * BATCH / ms:.0f} | {rows[0][1] / ms:.2f} | {setup:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
