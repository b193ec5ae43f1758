"""A damaged checkpoint (a file cut short or altered after it was written) is found at resume by its
manifest; resume falls back to the newest whole checkpoint and says which one it skipped and why."""

import json

import pandas as pd
import pytest
import torch
import yaml

from conftest import sentiment_rows, tiny_config
from tunesmith.checkpoint import (MANIFEST, TrainState, checkpoint_problem, load_checkpoint, resumable_checkpoint,
                                  save_checkpoint)
from tunesmith.errors import TunesmithError

DAMAGED_FILES = ["model.safetensors", "state.json", "optimizer.pt", "rng.pt", "scheduler.pt"]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)


def _two_checkpoints(run_dir):
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    save_checkpoint(run_dir, model, opt, sched, TrainState(step=10))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.linear(torch.ones(1, 4)).sum().backward()
    opt.step()
    save_checkpoint(run_dir, model, opt, sched, TrainState(step=20))
    return expected


def _cut(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("name", DAMAGED_FILES)
def test_a_truncated_file_in_the_newest_checkpoint_falls_back_to_the_previous(name, tmp_path, capsys):
    expected = _two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000020"
    assert checkpoint_problem(newest) is None
    _cut(newest / name)

    found = resumable_checkpoint(tmp_path)
    assert found.name == "step-0000010"
    err = capsys.readouterr().err
    assert f"warning: {newest}: checkpoint skipped ({name} has " in err and "resuming from an older one" in err
    fresh = _Tiny()
    opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = load_checkpoint(found, fresh, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    assert state.step == 10
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_same_size_but_altered_bytes_fail_the_checksum(tmp_path, capsys):
    _two_checkpoints(tmp_path)
    weights = tmp_path / "checkpoints" / "step-0000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert resumable_checkpoint(tmp_path).name == "step-0000010"
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err


def test_a_missing_or_torn_manifest_is_a_damaged_checkpoint(tmp_path):
    _two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-0000020"
    _cut(newest / MANIFEST)
    assert checkpoint_problem(newest) == f"{MANIFEST} is unreadable"
    (newest / "optimizer.pt").unlink()
    (newest / MANIFEST).unlink()  # as written before manifests existed: accepted when its files are there
    assert checkpoint_problem(newest) == "optimizer.pt is missing"


def test_no_whole_checkpoint_is_one_error_naming_each(tmp_path, capsys):
    _two_checkpoints(tmp_path)
    for step in ("step-0000010", "step-0000020"):
        _cut(tmp_path / "checkpoints" / step / "rng.pt")
    with pytest.raises(TunesmithError) as err:
        resumable_checkpoint(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'checkpoints'}: no usable checkpoint to resume from (step-0000020, "
                              "step-0000010 damaged, see the warnings above); start the run again without --resume")
    assert "no older checkpoint" in capsys.readouterr().err


def test_the_next_save_replaces_the_damaged_checkpoint_a_resume_went_back_past(tmp_path):
    """Resumed from step 10 past a damaged step 20, a stop at step 15 must not keep the damaged 20 and
    delete the whole 10: checkpoints beyond the one being saved are removed."""
    _two_checkpoints(tmp_path)
    _cut(tmp_path / "checkpoints" / "step-0000020" / "model.safetensors")
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), TrainState(step=15))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000010", "step-0000015"]


def test_resume_past_a_damaged_checkpoint_ends_as_the_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    """End to end: the newest checkpoint's weights cut short; --resume warns, trains again from the one
    before and ends with the same test metrics; with no whole checkpoint left: one error line, exit 2."""
    from tunesmith.cli import main

    pd.DataFrame(sentiment_rows(200, seed=5)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(60, seed=6)).to_csv(tmp_path / "test.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "runs", epochs=1,
                      checkpoint_every_steps=4, eval_every_steps=4, keep_checkpoints=True)
    cfg["output"]["name"] = "damaged"
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(cfg_path)]) == 0
    run = tmp_path / "runs" / "damaged"
    reference = json.loads((run / "metrics.json").read_text())
    newest, older = sorted((run / "checkpoints").glob("step-*"), reverse=True)[:2]
    _cut(newest / "model.safetensors")
    (run / "metrics.json").unlink()  # as if killed before the end (a finished run has nothing to resume)
    capsys.readouterr()

    assert main(["train", str(cfg_path), "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {newest}: checkpoint skipped (model.safetensors has" in err
    assert f"resumed from {older} " in err and "Traceback" not in err
    got = json.loads((run / "metrics.json").read_text())
    assert got["test"] == reference["test"] and got["best_step"] == reference["best_step"]

    for ckpt in (run / "checkpoints").glob("step-*"):
        _cut(ckpt / "state.json")
    (run / "metrics.json").unlink()
    assert main(["train", str(cfg_path), "--resume", str(run)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no usable checkpoint to resume from" in errors[0]
