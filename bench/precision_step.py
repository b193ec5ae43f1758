"""Milliseconds per training step by precision and model size, on whatever device torch sees.

    .venv/bin/python bench/precision_step.py

Randomly initialised BERTs of three sizes (speed does not depend on the weights): MiniLM-L6's shape
(22.7M), BERT-base's (110M) and BERT-large's (335M). Each step: forward + backward + AdamW on a batch
of 32 texts with padding, lengths drawn like length-grouped batches (a new width each step).
Precisions: fp32, fp32 with TF32 matmuls, bf16 autocast; then fp32 and bf16 with every width rounded
up to a multiple of 16 (train.pad_to_multiple_of). Prints a markdown table; this is the
evidence behind what `train.precision: auto` picks on a GPU (see inference.choose_precision).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

SIZES = {"MiniLM-L6 shape (22.7M)": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                         intermediate_size=1536),
         "BERT-base shape (110M)": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072),
         "BERT-large shape (335M)": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                         intermediate_size=4096)}


def step_ms(size: dict, precision: str, device: torch.device, steps: int = 40, batch: int = 32,
            multiple: int = 1) -> float:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, num_labels=2, **size)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    rng = np.random.default_rng(0)
    widths = -(-rng.integers(16, 129, size=steps + 5) // multiple) * multiple
    times = []
    for i, width in enumerate(widths):
        ids = torch.randint(1000, 30000, (batch, int(width)), device=device)
        mask = torch.ones_like(ids)
        mask[: batch // 2, int(width) * 3 // 4:] = 0  # some padding, as in real batches
        labels = torch.randint(0, 2, (batch,), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 5:  # the first steps load kernels
            times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def profile(size: dict, precision: str, device: torch.device) -> None:
    """Top operators of 10 steps, by self CPU time (where a launch-bound step spends it)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step_ms(size, precision, device, steps=3)  # warm-up
    with torch_profile(activities=activities) as prof:
        step_ms(size, precision, device, steps=10)
    print(f"\n{precision}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    import sys
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {name}, torch {torch.__version__}; "
          "median ms per step (batch 32, width 16-128)\n")
    print("| model | fp32 | fp32 + TF32 | bf16 autocast | fp32, widths x16 | bf16 autocast, widths x16 |")
    print("|---|---|---|---|---|---|")
    for label, size in SIZES.items():
        row = [f"{step_ms(size, p, device):.1f}" for p in ("fp32", "tf32", "bf16")]
        row += [f"{step_ms(size, p, device, multiple=16):.1f}" for p in ("fp32", "bf16")]
        print(f"| {label} | " + " | ".join(row) + " |", flush=True)
    if "--profile" in sys.argv:
        for precision in ("fp32", "bf16"):
            profile(SIZES["MiniLM-L6 shape (22.7M)"], precision, device)


if __name__ == "__main__":
    main()
