"""Fault injection: SIGKILL a small training run at random moments spread over its whole length (training
steps, checkpoint and log writes, test predictions, model writes, the refit), `--resume` after each kill
until the run finishes, and check it ends byte for byte where the uninterrupted run ends.

The kill moments are drawn (seeded) over the measured duration of the uninterrupted run. A resumed run is
itself killed again when its draw comes before it finishes, so one chain of kills crosses every phase; a
chain ends when a run finishes, is compared with the reference, and the next chain starts a new run.

Default: 9 kills (about 90 s). TUNESMITH_FAULT_KILLS=40 runs the long campaign (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import yaml

from conftest import TUNESMITH, sentiment_rows, tiny_config

KILLS = int(os.environ.get("TUNESMITH_FAULT_KILLS", "9"))
SEED = int(os.environ.get("TUNESMITH_FAULT_SEED", "19"))


def _config(tiny_model_dir: Path, tmp_path: Path) -> dict:
    # refit on 200 rows with validation_fraction: the run trains again on train + validation after its plan
    # (train.refit: true), so kills land in the refit too; a checkpoint every 5 steps makes checkpoint writes
    # a good share of the run's time.
    pd.DataFrame(sentiment_rows(200, seed=1)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(60, seed=2)).to_csv(tmp_path / "test.csv", index=False)
    return tiny_config(tiny_model_dir, tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "runs",
                       epochs="auto", max_steps=80, batch_size=8, lr=1e-3, checkpoint_every_steps=5,
                       eval_every_steps=20, refit=True)


def _fingerprint(run: Path) -> dict:
    """What must match the uninterrupted run: the model files' bytes, the test metrics, the predictions."""
    # the saved config names the run's own folder (the refit's output.dir): that path is the one difference
    model = {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes().replace(str(run).encode(), b"RUN")).hexdigest()
             for p in sorted((run / "model").rglob("*")) if p.is_file()}
    metrics = json.loads((run / "metrics.json").read_text())
    return {"model": model, "test": metrics["test"], "refit": metrics.get("refit", {}).get("status"),
            "best_step": metrics["best_step"], "predictions": (run / "test_predictions.csv").read_bytes()}


def _leftovers(run: Path) -> list[str]:
    """Temporary files and folders of atomic writes (named '.target.xxxx'), the lock excepted."""
    return sorted(p.relative_to(run).as_posix() for p in run.rglob(".*") if p.name != ".lock")


TRAINING = "learning rate per layer"  # logged once the model is built, right before training starts


def _start(cmd: list[str], env: dict, cwd: Path, err: Path) -> subprocess.Popen:
    with open(err, "w") as f:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=f)


def _logged(err: Path) -> list[str]:
    return [x for x in err.read_text(errors="replace").splitlines() if x.startswith(("tunesmith:", "warning:"))]


def _wait_or_kill(proc: subprocess.Popen, err: Path, anchored: bool, delay: float) -> int:
    """Kill the process `delay` seconds after it starts (anchored False) or after it logs TRAINING (anchored:
    a resumed run spends a few seconds importing and reading before it trains again); its exit code."""
    began = time.monotonic()
    while anchored and proc.poll() is None:
        if any(TRAINING in line for line in _logged(err)):
            break
        time.sleep(0.01)
    try:
        return proc.wait(timeout=max(0.0, delay - (0 if anchored else time.monotonic() - began)))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        return proc.wait()


def _chain(name: str, delays: list[float], train: list[str], runs: Path, env: dict, cwd: Path,
           kills: list[dict]) -> Path:
    """One run killed at each delay in turn (the first after the process starts, the others after the resumed
    run starts training again), then resumed until it finishes; returns its folder."""
    cmd, run = train + [f"--output.name={name}"], runs / name
    for attempt in range(len(delays) + 20):  # the kills, then resumes until done (a bound, not a hang)
        err = cwd / f"{name}-{attempt}.err"
        temps_before = _leftovers(run) if run.is_dir() else []
        proc = _start(cmd, env, cwd, err)
        if attempt < len(delays):
            rc = _wait_or_kill(proc, err, anchored=attempt > 0, delay=delays[attempt])
        else:
            rc = proc.wait(timeout=600)
        if rc == 0:
            return run
        assert rc == -signal.SIGKILL, err.read_text()
        logged = _logged(err)
        kills.append({"chain": name, "last_log": logged[-1][:100] if logged else "(starting up: nothing logged)",
                      "inside_a_write": sorted(set(_leftovers(run) if run.is_dir() else []) - set(temps_before))})
        if (run / "config.yaml").is_file():
            cmd = train + ["--resume", str(run)]
        elif run.is_dir():  # created, then killed before its config was written: start the run again
            os.rename(run, runs / f"{name}-stillborn-{attempt}")
    raise AssertionError(f"{name}: not finished after {attempt + 1} attempts")


def test_sigkill_anywhere_then_resume_ends_byte_identical(tiny_model_dir, tmp_path, cli_env):
    cli_env["OMP_NUM_THREADS"] = "1"  # the same thread count in every run: identical floating point
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_dir, tmp_path)))
    runs = tmp_path / "runs"
    train = TUNESMITH + ["train", str(cfg_path)]

    err = tmp_path / "reference.err"
    began = time.monotonic()
    proc = _start(train + ["--output.name=reference"], cli_env, tmp_path, err)
    while proc.poll() is None and not any(TRAINING in line for line in _logged(err)):
        time.sleep(0.01)
    training_at = time.monotonic() - began
    assert proc.wait(timeout=600) == 0, err.read_text()
    duration = time.monotonic() - began
    expected = _fingerprint(runs / "reference")
    assert expected["refit"] == "done", "the config should refit, so that kills land in the refit too"

    # Each chain draws its kill moments over the reference run: the first anywhere in it (importing, reading
    # the data, training...), the next ones as gaps between sorted moments of its training-to-end part.
    rng = random.Random(SEED)
    kills: list[dict] = []
    chains = 0
    while len(kills) < KILLS:
        chains += 1
        per_chain = min(5, KILLS - len(kills))
        moments = sorted(rng.uniform(0, duration - training_at) for _ in range(per_chain - 1))
        delays = [rng.uniform(0, duration)] + [b - a for a, b in zip([0.0] + moments, moments)]
        name = f"chain-{chains}"
        run = _chain(name, delays, train, runs, cli_env, tmp_path, kills)
        got = _fingerprint(run)
        assert got["model"] == expected["model"], f"{name}: model bytes differ after kills {kills}"
        assert got["test"] == expected["test"] and got["best_step"] == expected["best_step"], name
        assert got["predictions"] == expected["predictions"], f"{name}: test_predictions.csv differs"
        assert got["refit"] == "done"
        assert _leftovers(run) == [], f"{name}: temporary files left behind"

    inside = sum(bool(k["inside_a_write"]) for k in kills)
    print(f"\nfault injection: reference run {duration:.1f}s ({training_at:.1f}s to training); {len(kills)} "
          f"SIGKILLs in {chains} chains, {inside} inside a write (temporary file present); every chain ended "
          "byte-identical to the reference (model files, test metrics, test_predictions.csv)")
    for k in kills:
        print(f"  {k['chain']}: last log: {k['last_log']}"
              + (f"; mid-write: {', '.join(k['inside_a_write'])}" if k["inside_a_write"] else ""))


# ---------------------------------------------------------------- the two cases the kills above turned up

def _small_run(tiny_model_dir: Path, tmp_path: Path, name: str) -> dict:
    cfg = _config(tiny_model_dir, tmp_path)
    cfg["train"].update(max_steps=20, refit=False)
    cfg["output"]["name"] = name
    return cfg


def test_resume_before_the_first_checkpoint_trains_from_step_0(tiny_model_dir, tmp_path, capsys):
    # a kill after the run folder and its config were written, before the first checkpoint: --resume used to
    # stop with 'no checkpoint to resume from'; it now trains from step 0 and ends as an uninterrupted run
    from tunesmith.train import train

    reference = train(_small_run(tiny_model_dir, tmp_path, "reference")).run_dir
    early = tmp_path / "runs" / "early"
    early.mkdir()
    (early / "config.yaml").write_bytes((reference / "config.yaml").read_bytes())
    setup_line = (reference / "metrics.jsonl").read_text().splitlines()[0]
    (early / "metrics.jsonl").write_text(setup_line + "\n" + setup_line[:20])  # and a torn line after it
    (early / ".metrics.json.k1ll3d_x").write_text("{")  # a temporary file a kill left: removed on resume
    train(None, resume=early)
    assert _leftovers(early) == []
    assert "no checkpoint yet (stopped before the first one); training from step 0" in capsys.readouterr().err
    assert _fingerprint(early) == _fingerprint(reference)
    assert (early / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tiny_model_dir, tmp_path, capsys):
    # a kill after the last write (the run is complete): --resume used to stop with 'no checkpoint to resume
    # from' (exit 2), so a scheduler retrying the job saw a failure
    from tunesmith.train import train

    run = train(_small_run(tiny_model_dir, tmp_path, "done")).run_dir
    (run / "checkpoints" / "step-0000005").mkdir(parents=True)  # a kill while they were being removed
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    (run / ".test_predictions.csv.k1ll3d_x").write_text("text,")  # a temporary file of an earlier kill
    result = train(None, resume=run)
    assert "the run has finished already (metrics.json); nothing to resume" in capsys.readouterr().err
    assert result.metrics == json.loads((run / "metrics.json").read_text())["test"]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert not (run / "checkpoints").exists()
    assert _leftovers(run) == []
