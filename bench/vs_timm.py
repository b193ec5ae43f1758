"""tunesmith's image classification against a plain PyTorch + timm fine-tuning loop, measured in one script.

    .venv/bin/python bench/vs_timm.py                        # mnist_5k, efficientnet-lite0 at 64 px, 2 epochs
    .venv/bin/python bench/vs_timm.py --dataset digits --size 32 --epochs 3

Same pretrained model (the catalog's EfficientNet-Lite0: ImageNet weights from a package), same images
(a catalog dataset's train folder; its test folder, never seen in training, for accuracy), same input
size, epochs, batch 32, AdamW (lr 1e-3, weight decay 0.01), 10% linear warm-up then linear decay, seed 0,
augmentation off on both sides, all training images used (no validation split). Each side runs in its own
process, one after the other:
  plain_fp32   the loop a user writes: torchvision ImageFolder + Resize / CenterCrop / ToTensor / Normalize
               (the model's own mean, std, crop), DataLoader(batch 32, shuffle), AdamW, fp32
  plain_bf16   the same under torch.autocast(bfloat16), where the CPU has fast bf16 (else skipped)
  tunesmith    tunesmith.train with those settings, everything else its defaults (precision auto: for
               image models bf16 only on AMX CPUs; the fused AdamW, images decoded once, channels-last
               convolutions)
Train images/s counts the training loop (image loading and transforms included on both sides; tunesmith's
one-off decode is added to its training time); eval images/s is the test split; wall s is the whole process.
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

SEED, BATCH, LR, WD, WARMUP = 0, 32, 1e-3, 0.01, 0.1


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def side_plain(dataset: str, size: int, epochs: int, bf16: bool) -> dict:
    import timm
    import torch
    import torchvision
    from torchvision import transforms
    from tunesmith import catalog

    torch.manual_seed(SEED)
    folder, model_dir = catalog.dataset_path(dataset), catalog.model_path("efficientnet-lite0")
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True, num_classes=10)
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = transforms.Compose([
        transforms.Resize(int(size / cfg["crop_pct"]), interpolation=transforms.InterpolationMode(cfg["interpolation"])),
        transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(cfg["mean"], cfg["std"])])
    load = lambda p: torchvision.datasets.folder.default_loader(p)  # noqa: E731  (PIL, RGB)
    train = torchvision.datasets.ImageFolder(folder / "train", tf, loader=load)
    test = torchvision.datasets.ImageFolder(folder / "test", tf, loader=load)
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(SEED))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    total = epochs * len(loader)
    warmup = round(WARMUP * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - started
    model.eval()
    correct, started = 0, time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for x, y in torch.utils.data.DataLoader(test, batch_size=128):
            correct += int((model(x).argmax(1) == y).sum())
    eval_seconds = time.perf_counter() - started
    return {"train_ips": epochs * len(train) / train_seconds, "eval_ips": len(test) / eval_seconds,
            "accuracy": correct / len(test), "precision": "bf16" if bf16 else "fp32"}


def side_tunesmith(dataset: str, size: int, epochs: int, workdir: Path) -> dict:
    import tunesmith
    started = time.perf_counter()
    result = tunesmith.train({
        "task": "image_classification", "model": {"name": "efficientnet-lite0"},
        "data": {"dataset": dataset, "validation_fraction": 0},
        "image_classification": {"image_size": size},
        "train": {"epochs": epochs, "batch_size": BATCH, "lr": LR, "weight_decay": WD, "warmup_ratio": WARMUP,
                  "seed": SEED, "dropout": "model"},  # the plain loop keeps the model's dropout (auto drops it at 1 epoch)
        "output": {"dir": str(workdir)}})
    summary = json.loads((result.run_dir / "metrics.json").read_text())
    n_train = summary["data"]["train"]
    return {"train_ips": epochs * n_train / (summary["train"]["seconds"] + summary["data"]["encode_seconds"]),
            "eval_ips": summary["test_samples_per_second"], "accuracy": result.metrics["accuracy"],
            "precision": summary["train"]["precision"], "total_s": time.perf_counter() - started}


def run_side(side: str, args) -> dict:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tunesmith-vs-timm-") as tmp:
        proc = subprocess.run([sys.executable, __file__, "--child", side, "--dataset", args.dataset,
                               "--size", str(args.size), "--epochs", str(args.epochs), "--workdir", tmp],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist_5k")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--child")
    parser.add_argument("--workdir")
    args = parser.parse_args()
    if args.child:
        if args.child == "tunesmith":
            result = side_tunesmith(args.dataset, args.size, args.epochs, Path(args.workdir))
        else:
            result = side_plain(args.dataset, args.size, args.epochs, bf16=args.child == "plain_bf16")
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    from tunesmith.inference import choose_precision
    sides = ["plain_fp32"] + (["plain_bf16"] if choose_precision("auto") == "bf16" else []) + ["tunesmith"]
    flags = Path("/proc/cpuinfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no fast bf16"
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu} ({bf16}), {os.cpu_count()} cores; "
          f"{args.dataset}, efficientnet-lite0 at {args.size} px, {args.epochs} epochs, batch {BATCH}, lr {LR:g}")
    print("| side | precision | train images/s | eval images/s | test accuracy | peak RSS MB | wall s |")
    print("|---|---|---|---|---|---|---|", flush=True)
    results = {}
    for side in sides:
        r = results[side] = run_side(side, args)
        print(f"| {side} | {r['precision']} | {r['train_ips']:.1f} | {r['eval_ips']:.1f} | {r['accuracy']:.4f} | "
              f"{r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} |", flush=True)
    best = max((s for s in sides if s != "tunesmith"), key=lambda s: results[s]["train_ips"])
    t, b = results["tunesmith"], results[best]
    print(f"\ntunesmith / {best} (the faster plain loop): train {t['train_ips'] / b['train_ips']:.2f}x, "
          f"eval {t['eval_ips'] / b['eval_ips']:.2f}x, accuracy {100 * (t['accuracy'] - b['accuracy']):+.2f} points, "
          f"peak RSS {t['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
