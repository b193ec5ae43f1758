"""The disk fills up while a run writes (checkpoints, logs, the model, predictions): the run stops with one
`error:` line and no traceback, nothing written before is corrupted, and once space returns `--resume`
ends exactly where an uninterrupted run ends.

The run's output folder is a small tmpfs that the test mounts itself; where mounting is not allowed (not
root, no CAP_SYS_ADMIN) the test is skipped and says why. TUNESMITH_DISK_FULL_POINTS sets how many fill
points to try (default 4; bench-length: 30).
"""

import errno
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TUNESMITH, sentiment_rows, tiny_config

POINTS = int(os.environ.get("TUNESMITH_DISK_FULL_POINTS", "4"))


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount_point)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot give the run a small disk to fill")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip() or 'mount refused'}): needs root "
                    "with CAP_SYS_ADMIN")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Write zeros until the disk is full; returns the filler file (delete it to give the space back)."""
    filler = disk / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def _cfg(tiny_model_dir, tmp_path, out: Path) -> Path:
    if not (tmp_path / "train.csv").exists():
        pd.DataFrame(sentiment_rows(400, seed=5)).to_csv(tmp_path / "train.csv", index=False)
        pd.DataFrame(sentiment_rows(200, seed=6)).to_csv(tmp_path / "test.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", tmp_path / "test.csv", out, epochs=2, batch_size=8,
                      lr=1e-3, checkpoint_every_steps=10, eval_every_steps=30)
    path = tmp_path / f"cfg-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _summary(run: Path) -> tuple[dict, pd.DataFrame]:
    return json.loads((run / "metrics.json").read_text()), pd.read_csv(run / "test_predictions.csv")


def test_disk_full_at_random_points_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, cli_env,
                                                                     small_disk):
    reference_cfg = _cfg(tiny_model_dir, tmp_path, tmp_path / "runs")
    started = time.perf_counter()
    reference = subprocess.run(TUNESMITH + ["train", str(reference_cfg), "--output.name=reference"],
                               capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    duration = time.perf_counter() - started
    assert reference.returncode == 0, reference.stderr
    ref, ref_preds = _summary(tmp_path / "runs" / "reference")

    cfg = _cfg(tiny_model_dir, tmp_path, small_disk / "runs")
    rng = random.Random(0)
    outcomes = []
    for i in range(POINTS):
        name = f"full-{i}"
        delay = rng.uniform(0.1, 1.0) * duration  # anywhere in the run: start-up, training, the final writes
        proc = subprocess.Popen(TUNESMITH + ["train", str(cfg), f"--output.name={name}"], env=cli_env,
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        filler = _fill(small_disk)
        stderr = proc.communicate(timeout=300)[1]
        filler.unlink()  # the space comes back
        run = small_disk / "runs" / name
        assert "Traceback" not in stderr, stderr[-3000:]
        if proc.returncode != 0:
            assert proc.returncode == 2, stderr[-2000:]
            last = stderr.strip().splitlines()[-1]
            assert last.startswith("error:"), stderr[-2000:]
        outcomes.append(proc.returncode)
        if proc.returncode != 0 or not (run / "metrics.json").is_file():
            if (run / "config.yaml").is_file():
                resumed = subprocess.run(TUNESMITH + ["train", str(cfg), "--resume", str(run)],
                                         capture_output=True, text=True, env=cli_env, cwd=tmp_path)
                if resumed.returncode != 0 and "no checkpoint" in resumed.stderr:  # full before the first one
                    resumed = subprocess.run(TUNESMITH + ["train", str(cfg), f"--output.name={name}-again"],
                                             capture_output=True, text=True, env=cli_env, cwd=tmp_path)
                    run = small_disk / "runs" / f"{name}-again"
            else:  # full before the run folder was written: the user starts it again
                resumed = subprocess.run(TUNESMITH + ["train", str(cfg), f"--output.name={name}-again"],
                                         capture_output=True, text=True, env=cli_env, cwd=tmp_path)
                run = small_disk / "runs" / f"{name}-again"
            assert resumed.returncode == 0, resumed.stderr[-3000:]
        got, got_preds = _summary(run)
        assert got["test"] == ref["test"] and got["best_step"] == ref["best_step"], (i, delay)
        assert (got_preds["predicted_label"] == ref_preds["predicted_label"]).all()
        assert (got_preds["prob_pos"] - ref_preds["prob_pos"]).abs().max() < 1e-5
        leftovers = [str(p) for p in run.rglob(".*") if p.name != ".lock"]  # temporary files are .NAME.xxxx
        assert not leftovers, f"temporary files left behind: {leftovers}"
    print(f"disk full at {POINTS} points: {outcomes.count(2)} runs stopped with an error line, "
          f"{outcomes.count(0)} finished; every one ended equal to the uninterrupted run")
