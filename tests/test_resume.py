"""A run killed with SIGKILL mid-epoch and resumed ends exactly where the uninterrupted run ends."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import TUNESMITH, sentiment_rows, sigint_as_at_a_terminal, tiny_config
from tunesmith.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint


def _config(tiny_model_dir, tmp_path) -> dict:
    pd.DataFrame(sentiment_rows(1600, seed=5)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(200, seed=6)).to_csv(tmp_path / "test.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "runs",
                      epochs=2, batch_size=8, lr=1e-3, warmup_ratio=0.1, checkpoint_every_steps=10,
                      eval_every_steps=50)
    cfg["data"]["validation_fraction"] = 0.1
    return cfg


def _train(cfg_path, name, env, cwd, extra=()):
    return subprocess.run(TUNESMITH + ["train", str(cfg_path), f"--output.name={name}", *extra],
                          capture_output=True, text=True, env=env, cwd=cwd)


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_model_dir, tmp_path, cli_env):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_dir, tmp_path)))
    runs = tmp_path / "runs"

    reference = _train(cfg_path, "reference", cli_env, tmp_path)
    assert reference.returncode == 0, reference.stderr

    proc = subprocess.Popen(TUNESMITH + ["train", str(cfg_path), "--output.name=killed"], env=cli_env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = runs / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and int(latest.read_text().strip().split("-")[1] or 0) >= 40:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed = runs / "killed"
    assert not (killed / "metrics.json").exists()
    state = json.loads((latest_checkpoint(killed) / "state.json").read_text())
    assert state["epoch"] == 0 and state["batch_in_epoch"] > 0, "the kill should land mid-epoch"

    resumed = subprocess.run(TUNESMITH + ["train", str(cfg_path), "--resume", str(killed)],
                             capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    ref = json.loads((runs / "reference" / "metrics.json").read_text())
    got = json.loads((killed / "metrics.json").read_text())
    assert got["test"] == ref["test"]
    assert got["best_step"] == ref["best_step"] and got["train"]["steps"] == ref["train"]["steps"]
    ref_preds = pd.read_csv(runs / "reference" / "test_predictions.csv")
    got_preds = pd.read_csv(killed / "test_predictions.csv")
    assert (ref_preds["predicted_label"] == got_preds["predicted_label"]).all()
    assert (ref_preds["prob_pos"] - got_preds["prob_pos"]).abs().max() < 1e-5
    ref_log = [json.loads(x) for x in (runs / "reference" / "metrics.jsonl").read_text().splitlines()]
    got_log = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got_log] == [r["step"] for r in ref_log]
    assert [r.get("validation") for r in got_log] == [r.get("validation") for r in ref_log]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)


def _opt_sched(model):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def test_kill_during_save_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = _Tiny()
    opt, sched = _opt_sched(model)
    save_checkpoint(tmp_path, model, opt, sched, TrainState(step=10, batch_in_epoch=10))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        model.linear.weight.add_(1.0)
    real_save = torch.save

    def dying_save(obj, path, *a, **kw):
        if str(path).endswith("scheduler.pt"):
            raise SystemExit("killed mid-save")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(SystemExit):
        save_checkpoint(tmp_path, model, opt, sched, TrainState(step=20))
    monkeypatch.setattr(torch, "save", real_save)

    found = latest_checkpoint(tmp_path)
    assert found.name == "step-0000010"
    fresh = _Tiny()
    opt2, sched2 = _opt_sched(fresh)
    state = load_checkpoint(found, fresh, opt2, sched2)
    assert state.step == 10
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())
    # the next save sweeps the half-written folder away
    save_checkpoint(tmp_path, model, opt, sched, TrainState(step=30))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000010", "step-0000030"]


def test_resume_drops_a_torn_last_log_line_and_says_so(tiny_model_dir, tmp_path, capsys):
    """A full disk or a kill while appending to metrics.jsonl leaves half a line; --resume drops it."""
    from tunesmith.cli import main

    pd.DataFrame(sentiment_rows(200, seed=5)).to_csv(tmp_path / "train.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "runs", epochs=1,
                      checkpoint_every_steps=5, eval_every_steps=5, keep_checkpoints=True)
    cfg["output"]["name"] = "torn"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path)]) == 0
    run = tmp_path / "runs" / "torn"
    log = run / "metrics.jsonl"
    whole = log.read_bytes()
    log.write_bytes(whole[:-40])  # the last record cut short, no newline
    (run / "metrics.json").unlink()  # the kill came while appending, before the run's last write
    capsys.readouterr()

    assert main(["train", str(cfg_path), "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "dropped 1 unreadable line(s)" in err and "Traceback" not in err
    lines = log.read_text().splitlines()
    assert [json.loads(x) for x in lines]  # every line reads again
    assert lines == whole.decode().splitlines()[:-1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_checkpoints_and_says_how_to_resume(signum, tiny_model_dir, tmp_path, cli_env):
    """SIGTERM (schedulers, docker stop) stops like Ctrl-C: the step in progress ends, a checkpoint of it is
    saved, one error line says how to resume, no temporary file is left; exit 128 + signal (143, 130)."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_dir, tmp_path)))
    runs = tmp_path / "runs"
    stderr = tmp_path / "stopped.log"
    with open(stderr, "w") as err_file:
        proc = subprocess.Popen(TUNESMITH + ["train", str(cfg_path), "--output.name=stopped"], env=cli_env,
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err_file,
                                preexec_fn=sigint_as_at_a_terminal)
        _signal_after_checkpoint(proc, runs / "stopped", signum)
        assert proc.wait(timeout=120) == 128 + signum, stderr.read_text()[-3000:]
    err = stderr.read_text()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    stopped = runs / "stopped"
    assert f"error: interrupted ({signal.Signals(signum).name}) at step " in errors[0]
    assert errors[0].endswith(f"continue with: tunesmith train {stopped}/config.yaml --resume {stopped}")
    step = int(errors[0].split(") at step ")[1].split(",")[0])
    assert latest_checkpoint(stopped).name == f"step-{step:07d}", "the finished step is checkpointed"
    assert f"the checkpoint of step {step} is kept" in errors[0]
    assert not [p.name for p in (stopped / "checkpoints").iterdir() if p.name.startswith(".")], "temporary files left"
    assert not (stopped / "metrics.json").exists()
    if signum != signal.SIGTERM:
        return
    resumed = subprocess.run(TUNESMITH + ["train", str(cfg_path), "--resume", str(stopped)],
                             capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    reference = _train(cfg_path, "reference", cli_env, tmp_path)
    assert reference.returncode == 0, reference.stderr
    ref = json.loads((runs / "reference" / "metrics.json").read_text())
    got = json.loads((stopped / "metrics.json").read_text())
    assert got["test"] == ref["test"] and got["best_step"] == ref["best_step"]
    ref_log = [json.loads(x) for x in (runs / "reference" / "metrics.jsonl").read_text().splitlines()]
    got_log = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got_log] == [r["step"] for r in ref_log]


def _signal_after_checkpoint(proc: subprocess.Popen, run: Path, signum: int, step: int = 20) -> None:
    """Send signum once the run's latest checkpoint is of `step` or later (or give up after 120 s)."""
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and int(latest.read_text().strip().split("-")[1] or 0) >= step:
            proc.send_signal(signum)
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint of step {step} in {run} (exit code {proc.poll()})")


def test_a_run_started_ignoring_sigint_keeps_ignoring_it_while_training(tiny_model_dir, tmp_path, cli_env):
    """A script's `tunesmith train CONFIG &` starts with SIGINT ignored. Python keeps it ignored outside the
    loop, so the loop does too: a SIGINT mid-training changes nothing, and the run ends by its plan. (It once
    stopped only when the signal came during training, and a search's test missed its Ctrl-C when it came
    just before.) SIGTERM still stops it."""
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_dir, tmp_path)))
    run = tmp_path / "runs" / "ignoring"
    with open(tmp_path / "log.txt", "w") as err_file:
        proc = subprocess.Popen(TUNESMITH + ["train", str(cfg_path), "--output.name=ignoring"], env=cli_env,
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err_file,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        _signal_after_checkpoint(proc, run, signal.SIGINT)
        assert proc.wait(timeout=120) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    err = (tmp_path / "log.txt").read_text()
    assert "SIGINT" not in err and "error:" not in err, err
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 360  # 1,440 rows, batch 8, 2 epochs


def test_sigterm_outside_training_is_one_line_and_exit_143(monkeypatch, capsys):
    """Before or after the loop (reading data, writing predictions) SIGTERM unwinds like Ctrl-C."""
    import os

    from tunesmith import cli

    def slow_command(args, extra):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    def outside(signum, frame):  # what a SIGTERM the CLI leaves unhandled meets (not the death of pytest)
        raise RuntimeError("SIGTERM not handled by the CLI")

    monkeypatch.setattr(cli, "cmd_catalog", slow_command)
    before = signal.signal(signal.SIGTERM, outside)
    try:
        started = time.perf_counter()
        assert cli.main(["catalog"]) == 143
        assert time.perf_counter() - started < 4
        assert capsys.readouterr().err.strip() == "error: terminated"
        assert signal.getsignal(signal.SIGTERM) is outside, "the CLI puts the previous handler back"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tiny_model_dir, tmp_path, cli_env,
                                                                           capsys):
    """A run folder has one writer: `--resume` of a run that is training is refused naming the pid;
    once that process is gone (kill -9 here), its lock is no obstacle."""
    from tunesmith.cli import main

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tiny_model_dir, tmp_path)))
    run = tmp_path / "runs" / "locked"
    proc = subprocess.Popen(TUNESMITH + ["train", str(cfg_path), "--output.name=locked"], env=cli_env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and latest_checkpoint(run) is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the test could try a second writer"
        assert main(["train", str(cfg_path), "--resume", str(run)]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert errors == [(f"error: {run}: in use: another tunesmith process (pid {proc.pid}) is training in "
                               "it; wait for it to end, or stop it first")]
    finally:
        proc.kill()
        proc.wait()
    assert (run / ".lock").read_text().strip() == str(proc.pid)  # left behind by the killed process
    assert main(["train", str(cfg_path), "--resume", str(run)]) == 0
    assert (run / "metrics.json").is_file()


def test_two_runs_created_at_once_get_two_folders(tiny_model_dir, tmp_path, monkeypatch):
    """new_run_dir saw no folder, another run created it before our mkdir: take the next name, no
    FileExistsError."""
    import importlib

    import tunesmith

    train_module = importlib.import_module("tunesmith.train")

    pd.DataFrame(sentiment_rows(100, seed=5)).to_csv(tmp_path / "train.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "runs", max_steps=2)
    cfg["output"]["name"] = "same"
    real = train_module.new_run_dir
    taken = tmp_path / "runs" / "same"
    calls = []

    def racing_new_run_dir(c):
        calls.append(1)
        if len(calls) == 1:  # the name was free when looked at, then the other run made it
            taken.mkdir(parents=True)
            return taken
        return real(c)

    monkeypatch.setattr(train_module, "new_run_dir", racing_new_run_dir)
    result = tunesmith.train(cfg)
    assert result.run_dir == tmp_path / "runs" / "same-2"


def test_output_dir_that_cannot_be_created_is_one_line(tiny_model_dir, tmp_path, capsys):
    from tunesmith.cli import main

    pd.DataFrame(sentiment_rows(100, seed=5)).to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "file").write_text("not a folder")
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", None, tmp_path / "file" / "runs", max_steps=2)
    cfg["output"]["name"] = "r"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'file' / 'runs' / 'r'}: cannot create the run folder (Not a directory); " \
           "check output.dir" in err and "Traceback" not in err


def test_resume_after_the_last_step_writes_the_test_line_once(tiny_model_dir, tmp_path, capsys):
    """A kill after the test line was written (the run's last checkpoint is before it): the resumed run
    writes the test line again, so the old one is dropped; metrics.jsonl ends with one test line."""
    from tunesmith.cli import main

    pd.DataFrame(sentiment_rows(100, seed=5)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(30, seed=6)).to_csv(tmp_path / "test.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "runs",
                      max_steps=4, keep_checkpoints=True)
    cfg["output"]["name"] = "done"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path)]) == 0
    run = tmp_path / "runs" / "done"
    before = (run / "metrics.jsonl").read_text().splitlines()
    # killed after the test line, before metrics.json (with metrics.json the run counts as finished)
    (run / "metrics.json").unlink()
    assert main(["train", str(cfg_path), "--resume", str(run)]) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("test") == 1
    assert [json.loads(x) for x in before] == records


class _SharedWeights(torch.nn.Module):
    """Weights that share memory three ways: two slices of one tensor (a fused weight seen as two parameters),
    an input and output embedding tied as one parameter, and a channels-last (non-contiguous) convolution."""

    def __init__(self):
        super().__init__()
        fused = torch.randn(8, 4)
        self.q, self.k = torch.nn.Parameter(fused[:4]), torch.nn.Parameter(fused[4:])
        self.embed = torch.nn.Embedding(5, 4)
        self.out = torch.nn.Linear(4, 5, bias=False)
        self.out.weight = self.embed.weight
        self.conv = torch.nn.Conv2d(3, 2, 3).to(memory_format=torch.channels_last)

    def forward(self, x):
        return (self.out(self.embed(x) @ self.q @ self.k.T).sum() + self.conv(torch.ones(1, 3, 4, 4)).sum())


def test_a_checkpoint_keeps_weights_that_share_memory(tmp_path):
    """safetensors' save_model refuses parameters that are slices of one tensor ('None is covering the entire
    storage'), which failed such a model's first checkpoint; every weight must come back, tied ones still tied."""
    torch.manual_seed(0)
    model = _SharedWeights()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    model(torch.tensor([1, 2])).backward()
    opt.step()
    path = save_checkpoint(tmp_path, model, opt, sched, TrainState(step=1))

    torch.manual_seed(1)
    fresh = _SharedWeights()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    load_checkpoint(path, fresh, fresh_opt, torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda step: 1.0))
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    assert fresh.out.weight is fresh.embed.weight
    assert fresh.q.untyped_storage().data_ptr() == fresh.k.untyped_storage().data_ptr()  # still one fused tensor
    assert fresh.conv.weight.is_contiguous(memory_format=torch.channels_last)
