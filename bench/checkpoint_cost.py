"""What one resumable checkpoint of MiniLM-L6 costs: bytes written and seconds, as the loop saves it.

    .venv/bin/python bench/checkpoint_cost.py [--repeats 3]

The catalog's minilm-l6 with a 2-class head, one fused AdamW step taken (so the optimizer holds its two
moment tensors per weight), then save_checkpoint into a temporary folder `--repeats` times; prints the
bytes per file and the seconds of each save (medians; the page cache takes the writes, as in a run).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from tunesmith import catalog
from tunesmith.checkpoint import TrainState, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = AutoModelForSequenceClassification.from_pretrained(catalog.model_path("minilm-l6"), num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(input_ids=torch.ones(2, 8, dtype=torch.long), labels=torch.zeros(2, dtype=torch.long)).loss.backward()
    optimizer.step()
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(1, args.repeats + 1):
            started = time.perf_counter()
            folder = save_checkpoint(Path(tmp), model, optimizer, scheduler, TrainState(step=step))
            seconds.append(time.perf_counter() - started)
        sizes = {f.name: f.stat().st_size for f in sorted(folder.iterdir())}
    print(f"checkpoint of minilm-l6: {sum(sizes.values()) / 1e6:.1f} MB ("
          + ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in sizes.items() if size > 1e5)
          + f"); save {statistics.median(seconds):.2f} s median of {len(seconds)} "
          f"({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
