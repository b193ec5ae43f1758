"""A run folder that is damaged, untrusted or unwritable, and a disk that fills: one `error:` line, exit 2,
no traceback, nothing half-written. Full disks and read-only file systems are simulated (the tests may run
as root, whom chmod does not stop)."""

import errno
import json
import shutil
import tempfile

import pandas as pd
import pytest
import torch
import yaml

from conftest import sentiment_rows, tiny_config
from tunesmith.cli import main


def run_cli(capsys, args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err
    return code, (lines[0] if len(lines) == 1 else err)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A finished run (2 steps) and a small input file, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("trained")
    pd.DataFrame(sentiment_rows(80, seed=3)).to_csv(tmp / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(5, seed=4)).to_csv(tmp / "input.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp / "train.csv", None, tmp / "runs", max_steps=2)
    cfg["output"]["name"] = "run"
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp / "cfg.yaml")]) == 0
    return tmp / "runs" / "run", tmp / "input.csv"


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_truncated_model_weights_at_predict_and_evaluate(command, trained, tmp_path, capsys):
    run = _copy(trained[0], tmp_path)
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["--input", trained[1], "--output", tmp_path / "out.csv"] if command == "predict" else ["--data", trained[1]]
    code, line = run_cli(capsys, [command, run, *args])
    assert code == 2
    assert line.startswith(f"error: {run / 'model'}: the model cannot be loaded (") and "damaged or incomplete" in line
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_pickled_model_weights_are_refused_at_predict_and_evaluate(command, trained, tmp_path, capsys):
    """A run folder whose weights were swapped for a pickle: refused as train refuses a pickled backbone."""
    from safetensors.torch import load_file

    run = _copy(trained[0], tmp_path)
    weights = run / "model" / "model.safetensors"
    torch.save(load_file(weights), run / "model" / "pytorch_model.bin")
    weights.unlink()
    args = ["--input", trained[1], "--output", tmp_path / "out.csv"] if command == "predict" else ["--data", trained[1]]
    code, line = run_cli(capsys, [command, run, *args])
    assert code == 2
    assert line.startswith(f"error: {run / 'model'}: the weights are pickled (pytorch_model.bin)"), line
    assert "model.allow_pickle: true" in line

    saved = run / "model" / "tunesmith_config.yaml"  # the run's own config allows it: it loads
    cfg = yaml.safe_load(saved.read_text())
    cfg["model"]["allow_pickle"] = True
    saved.write_text(yaml.safe_dump(cfg))
    code, _ = run_cli(capsys, [command, run, *args])
    assert code == 0


@pytest.mark.parametrize("reason,code_", [("Read-only file system", errno.EROFS),
                                          ("No space left on device", errno.ENOSPC)])
def test_predict_output_that_cannot_be_written(reason, code_, trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.csv"
    if code_ == errno.EROFS:  # the temporary file cannot even be created
        def refuse(*a, **kw):
            raise OSError(code_, reason)
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    else:  # the disk fills while the rows are written
        def full(self, *a, **kw):
            raise OSError(code_, reason)
        monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    code, line = run_cli(capsys, ["predict", trained[0], "--input", trained[1], "--output", out])
    assert code == 2
    assert line.startswith(f"error: {out}: cannot write ({reason})")
    assert line.endswith("free some space and try again") == (code_ == errno.ENOSPC)
    assert not list(tmp_path.iterdir()), "no temporary file left"


def test_predict_output_in_a_missing_place(trained, tmp_path, capsys):
    out = tmp_path / "file" / "out.csv"
    (tmp_path / "file").write_text("a file, not a folder")
    code, line = run_cli(capsys, ["predict", trained[0], "--input", trained[1], "--output", out])
    assert code == 2 and line.startswith(f"error: {out}: cannot write (")


def _train_config(tiny_model_dir, tmp_path, **train):
    pd.DataFrame(sentiment_rows(80, seed=3)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(sentiment_rows(20, seed=4)).to_csv(tmp_path / "test.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "runs", **train)
    cfg["output"]["name"] = "full"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_disk_full_while_writing_test_predictions(tiny_model_dir, tmp_path, capsys, monkeypatch):
    cfg = _train_config(tiny_model_dir, tmp_path, max_steps=2)

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    code, line = run_cli(capsys, ["train", cfg])
    run = tmp_path / "runs" / "full"
    assert code == 2
    assert line == f"error: {run / 'test_predictions.csv'}: cannot write (No space left on device); " \
                   "free some space and try again"
    assert not [p.name for p in run.iterdir() if p.name.startswith(".test_predictions")], "temporary file left"


@pytest.mark.parametrize("error,hint", [
    (OSError(errno.ENOSPC, "No space left on device"), "free some space"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), "free some space"),
    (OSError(errno.EACCES, "Permission denied"), "fix that")], ids=["OSError", "torch-zip-writer", "no-permission"])
def test_disk_full_in_a_checkpoint_save_keeps_the_previous_one(error, hint, tiny_model_dir, tmp_path, capsys,
                                                               monkeypatch):
    """torch.save failing at the second checkpoint (a full disk, or no permission): one line saying how to resume,
    space advised only where space is what lacks; the first checkpoint stays whole and no temporary folder is left;
    once the cause is gone, --resume finishes."""
    cfg = _train_config(tiny_model_dir, tmp_path, max_steps=6, checkpoint_every_steps=2, eval_every_steps=2)
    real_save, calls = torch.save, []

    def filling_save(obj, path, *a, **kw):
        if str(path).endswith("optimizer.pt"):
            calls.append(path)
            if len(calls) == 2:
                raise error
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", filling_save)
    code, line = run_cli(capsys, ["train", cfg])
    run = tmp_path / "runs" / "full"
    assert code == 2
    assert line.startswith(f"error: {run / 'checkpoints' / 'step-0000004'}: cannot write the checkpoint (")
    assert line.endswith(f"the previous checkpoint is kept: {hint} and continue with: tunesmith train "
                         f"{run}/config.yaml --resume {run}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-0000002"]

    monkeypatch.setattr(torch, "save", real_save)
    code, err = run_cli(capsys, ["train", cfg.parent / "runs" / "full" / "config.yaml", "--resume", run])
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["train"]["steps"] == 6


REMOTE_CONFIG = '''from transformers import BertConfig


class TinyCustomConfig(BertConfig):
    model_type = "tiny-custom"
'''
REMOTE_MODEL = '''from transformers import BertForSequenceClassification, BertModel

from .configuration_tiny import TinyCustomConfig


class TinyCustomModel(BertModel):
    config_class = TinyCustomConfig


class TinyCustomForSequenceClassification(BertForSequenceClassification):
    config_class = TinyCustomConfig
'''


def test_predict_on_a_run_trained_with_trust_remote_code(tiny_model_dir, tmp_path, capsys):
    """A backbone whose code lives in its folder: the run saves that code in model/ and predict loads it with
    the run's trust_remote_code (it was a ValueError traceback: the run could not be used)."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "custom")
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny-custom", architectures=["TinyCustomModel"],
                  auto_map={"AutoConfig": "configuration_tiny.TinyCustomConfig",
                            "AutoModel": "modeling_tiny.TinyCustomModel",
                            "AutoModelForSequenceClassification": "modeling_tiny.TinyCustomForSequenceClassification"})
    (folder / "config.json").write_text(json.dumps(config))
    pd.DataFrame(sentiment_rows(80, seed=3)).to_csv(tmp_path / "train.csv", index=False)
    cfg = tiny_config(folder, tmp_path / "train.csv", None, tmp_path / "runs", max_steps=2)
    cfg["model"]["trust_remote_code"] = True
    cfg["output"]["name"] = "remote"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, err = run_cli(capsys, ["train", tmp_path / "cfg.yaml"])
    assert code == 0, err
    run = tmp_path / "runs" / "remote"
    assert (run / "model" / "modeling_tiny.py").is_file()
    capsys.readouterr()
    assert main(["predict", str(run), "--text", "a great film"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["predicted_label"] in ("pos", "neg") and "Traceback" not in err
