"""Every bad input: one clear line naming file, line/row and column (or key), exit code 2,
no traceback, and nothing half-written (no run folder, no output file)."""

import subprocess

import pandas as pd
import pytest
import yaml

from conftest import TUNESMITH, sentiment_rows, tiny_config
import tunesmith
from tunesmith import TunesmithError
from tunesmith.cli import main
from tunesmith.export import export


def run_cli(capsys, args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def good_train(tmp_path):
    path = tmp_path / "good.csv"
    pd.DataFrame(sentiment_rows(60)).to_csv(path, index=False)
    return path


def write_config(tmp_path, model_dir, train, **data):
    cfg = tiny_config(model_dir, train, None, tmp_path / "runs", epochs=1)
    cfg["data"].update(data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BAD_TRAIN_FILES = {
    "missing file": (None, "missing.csv: file not found"),
    "empty file": ("", "bad.csv: file is empty"),
    "header only": ("text,label\n", "bad.csv: no data rows"),
    "misspelled column": ("txet,label\nhi,pos\nho,neg\n", "no text column 'text' (columns: txet, label); did you mean 'txet'?"),
    "empty text": ("text,label\nhi,pos\n,neg\n", "bad.csv, line 3, column 'text': empty text"),
    "one class": ("text,label\nhi,pos\nho,pos\nha,pos\n", "column 'label' has only 1 class ('pos')"),
    "malformed row": ("text,label\nhi,pos\nhi,there,neg\n", "bad.csv, line 3: expected 2 fields"),
    "missing label": ("text,label\nhi,pos\nho,\n", "bad.csv, line 3, column 'label': missing label"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_FILES), ids=lambda c: c.replace(" ", "_"))
def test_bad_training_file(case, tmp_path, tiny_model_dir, capsys):
    content, expected = BAD_TRAIN_FILES[case]
    train = tmp_path / ("missing.csv" if content is None else "bad.csv")
    if content is not None:
        train.write_text(content)
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, train)])
    assert code == 2
    assert expected in error_line(err)
    assert not (tmp_path / "runs").exists(), "a failed run must not leave a run folder behind"


def test_non_utf8_training_file(tmp_path, tiny_model_dir, capsys):
    train = tmp_path / "latin1.csv"
    train.write_bytes("text,label\nok,pos\nnaïve,neg\n".encode("latin-1"))
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, train)])
    assert code == 2 and "latin1.csv, line 3, byte 3: not valid UTF-8 (byte 0xef)" in error_line(err)


def test_non_string_text_jsonl(tmp_path, tiny_model_dir, capsys):
    train = tmp_path / "d.jsonl"
    train.write_text('{"text": "good", "label": "pos"}\n{"text": ["a"], "label": "neg"}\n')
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, train)])
    assert code == 2 and "d.jsonl, line 2, column 'text': text must be a string" in error_line(err)


@pytest.mark.parametrize("override,expected", [
    (["--train.lrr", "1"], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (["--train.batch_size", "zero"], "train.batch_size: Input should be a valid integer"),
    (["--train.epochs", "-1"], "train.epochs: Input should be greater than 0"),
    (["--train.group_by_length", "maybe"],  # a union with 'auto' names both members
     "train.group_by_length: Input should be a valid boolean, unable to interpret input (or 'auto') (got 'maybe')"),
    (["--model.name", "./no/such/model"], "model './no/such/model': folder not found"),
    (["oops"], "unexpected argument 'oops'"),
    (["--train.metric", "f2"], "train.metric: unknown metric 'f2'"),
    (["--output.name", "../../x"], "output.name: must be a plain folder name, without '/', '\\' or '..'"),
    (["--output.name", "{tmp}/abs"], "output.name: must be a plain folder name"),  # an absolute path
    (["--output.name", ".."], "output.name: must be a plain folder name"),
    (["--output.name", "a\\b"], "output.name: must be a plain folder name"),
])
def test_bad_config_values(override, expected, tmp_path, tiny_model_dir, good_train, capsys):
    override = [arg.replace("{tmp}", str(tmp_path)) for arg in override]
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, good_train), *override])
    assert code == 2
    assert expected in error_line(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,expected", [
    (["--train.lr", "abc"], "error: command line --train.lr abc: train.lr: Input should be a valid number"),
    (["--train.batch_size", "-1"],
     "error: command line --train.batch_size -1: train.batch_size: Input should be greater than or equal to 1"),
    (["--trian.lr", "1"], "error: command line --trian.lr 1: unknown key 'trian' (did you mean 'train'?)"),
    (["--data.text_pair_column", "b"], "error: command line --data.text_pair_column b: 'data.text_pair_column' has "
                                       "moved to 'text_classification.text_pair_column'"),
    (["--imbalance.method", "class_weights", "--imbalance.weights", "{zzz: 2}"],  # found after the data is read
     "error: command line --imbalance.weights {'zzz': 2}: imbalance.weights: unknown class 'zzz'"),
])
def test_a_bad_override_is_reported_as_the_command_line_not_the_file(override, expected, tmp_path, tiny_model_dir,
                                                                      good_train, capsys):
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, good_train), *override])
    assert code == 2
    assert error_line(err).startswith(expected) and "cfg.yaml" not in err


def test_a_bad_value_in_the_file_still_names_its_line(tmp_path, tiny_model_dir, good_train, capsys):
    path = write_config(tmp_path, tiny_model_dir, good_train)
    text = path.read_text().replace("  lr: 0.002\n", "  lr: abc\n")
    path.write_text(text)
    line = text.splitlines().index("  lr: abc") + 1
    code, err = run_cli(capsys, ["train", path, "--train.epochs", "2"])  # an override of another key changes nothing
    assert code == 2
    assert error_line(err).startswith(f"error: {path}, line {line}: train.lr: Input should be a valid number")


def test_a_bad_override_of_a_saved_run_config_is_the_command_lines(tmp_path, tiny_model_dir, good_train, capsys):
    """serve and predict read the run's saved config with overrides: a bad one is not a line of that file."""
    config = write_config(tmp_path, tiny_model_dir, good_train)
    assert run_cli(capsys, ["train", config, "--output.name=r", "--train.max_steps", "1"])[0] == 0
    run = tmp_path / "runs" / "r"
    code, err = run_cli(capsys, ["serve", run, "--serve.port", "abc"])
    assert code == 2 and error_line(err).startswith(
        "error: command line --serve.port abc: serve.port: Input should be a valid integer")
    code, err = run_cli(capsys, ["predict", run, "--text", "good", "--max-new-tokens", "-1"])
    assert code == 2 and error_line(err).startswith(
        "error: command line --causal_lm.max_new_tokens -1: causal_lm.max_new_tokens: Input should be greater")


def test_a_count_or_size_below_1_is_refused_by_the_parser(tmp_path, tiny_model_dir, good_train, capsys):
    """--batch-size 0 or -1 crashed evaluate and predict with a traceback, and export took its default: every
    count and size flag is refused in one line naming it, before anything is read or written."""
    config = write_config(tmp_path, tiny_model_dir, good_train)
    assert run_cli(capsys, ["train", config, "--output.name=r", "--train.max_steps", "1"])[0] == 0
    run, onnx = tmp_path / "runs" / "r", tmp_path / "onnx"
    commands = {"evaluate": [run, "--data", good_train, "--batch-size"],
                "predict": [run, "--text", "good", "--batch-size"],
                "export": [run, "--data", good_train, "--output", onnx, "--batch-size"],
                "augment": [config, "--preview", "--n"],
                "train": [config, "--processes"]}
    for command, args in commands.items():
        for value in ("0", "-1", "two"):
            code, err = run_cli(capsys, [command, *args, value])
            assert code == 2 and error_line(err) == (f"error: argument {args[-1]}: give a whole number, 1 or more "
                                                     f"(got {value}); see tunesmith {command} --help")
    assert not onnx.exists()


def test_unseen_labels_at_evaluate_and_predict(tmp_path, tiny_model_dir, good_train, capsys):
    assert run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, good_train), "--output.name=r"])[0] == 0
    other = tmp_path / "other.csv"
    other.write_text("text,label\ngood film,pos\nit was fine,neutral\n")
    code, err = run_cli(capsys, ["evaluate", tmp_path / "runs" / "r", "--data", other])
    assert code == 2
    assert error_line(err) == (f"error: {other}, line 3, column 'label': label 'neutral' was not seen in "
                               "training (known: neg, pos)")
    out = tmp_path / "preds.csv"
    code, err = run_cli(capsys, ["predict", tmp_path / "runs" / "r", "--input", other, "--output", out])
    assert code == 2 and "label 'neutral' was not seen" in error_line(err)
    assert not out.exists(), "no half-written prediction file"
    code, err = run_cli(capsys, ["predict", tmp_path, "--input", other, "--output", out])
    assert code == 2 and "not a tunesmith run folder" in error_line(err)


def test_resume_without_checkpoint(tmp_path, capsys):
    code, err = run_cli(capsys, ["train", "x.yaml", "--resume", tmp_path])
    assert code == 2 and "not a tunesmith run folder" in error_line(err)


def test_real_process_exit_code_and_no_traceback(tmp_path, cli_env):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train: nothing.csv\ntrain:\n  epoch: 3\n")
    proc = subprocess.run(TUNESMITH + ["train", str(cfg)], capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {cfg}, line 4: unknown key 'train.epoch' (did you mean 'train.epochs'?)"


@pytest.mark.parametrize("text,expected", [
    ("data: {dataset: x}\ntrain: {lr: 0.5, max_steps: 2}\ntrain: {batch_size: 8}\n",
     "line 3, column 1: duplicate key 'train' (first on line 2)"),
    ("data: {dataset: x}\ntrain:\n  lr: &a [" + ", ".join(["&b [" + ", ".join(["1"] * 200) + "]"] + ["*b"] * 60)
     + "]\n", "aliases expand to more than 10,000 values"),
], ids=["duplicate-key", "alias-bomb"])
def test_hostile_yaml_is_one_error_line(text, expected, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, err = run_cli(capsys, ["train", cfg])
    assert code == 2 and expected in error_line(err)


def test_pickled_weights_are_refused_unless_allowed(tmp_path, good_train, capsys):
    """A folder with only pytorch_model.bin: unpickling can run code, so it loads only with model.allow_pickle."""
    import torch
    from safetensors.torch import load_file

    from conftest import VOCAB, save_tiny_bert

    folder = save_tiny_bert(tmp_path / "pickled", VOCAB)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert (folder / "pytorch_model.bin").is_file()
    cfg = write_config(tmp_path, folder, good_train)
    code, err = run_cli(capsys, ["train", cfg])
    assert code == 2
    assert (f"error: {folder}: the weights are pickled (pytorch_model.bin) and there is no .safetensors file; "
            "unpickling can run code") in error_line(err)
    assert "model.allow_pickle: true" in error_line(err)
    assert not (tmp_path / "runs").exists()
    code, err = run_cli(capsys, ["train", cfg, "--model.allow_pickle", "true", "--train.max_steps", "2"])
    assert code == 0, err


@pytest.mark.parametrize("which", ["config", "data"])
def test_unreadable_file_is_one_error_line(which, tmp_path, tiny_model_dir, good_train, capsys, monkeypatch):
    """No read permission (simulated: the tests may run as root, whom chmod does not stop)."""
    from pathlib import Path

    cfg = write_config(tmp_path, tiny_model_dir, good_train)
    target = cfg if which == "config" else good_train
    real_read_bytes, real_read_text = Path.read_bytes, Path.read_text

    def guard(path):
        if path == target:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", lambda self: guard(self) or real_read_bytes(self))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **kw: guard(self) or real_read_text(self, *a, **kw))
    code, err = run_cli(capsys, ["train", cfg])
    assert code == 2
    assert error_line(err) == f"error: {target}: cannot read the {'config ' if which == 'config' else ''}file " \
                              "(Permission denied)"


def test_a_huge_plan_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, good_train, capsys):
    cfg = write_config(tmp_path, tiny_model_dir, good_train)
    code, err = run_cli(capsys, ["train", cfg, "--train.epochs", "1e9"])
    assert code == 2
    assert error_line(err) == ("error: train.epochs 1e+09: 3,000,000,000 optimizer steps planned (3 per epoch); "
                               "more than 10,000,000 is taken for a mistake: lower it, or set train.time_limit to "
                               "train for a fixed time")
    assert not (tmp_path / "runs").exists()


def test_a_symlink_loop_or_broken_link_is_named(tmp_path, tiny_model_dir, capsys):
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, loop)])
    assert code == 2 and error_line(err) == (f"error: {loop}: symlink loop (the link leads back to itself); "
                                             "point it at the file")
    broken = tmp_path / "broken.csv"
    broken.symlink_to(tmp_path / "gone.csv")
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, broken)])
    assert code == 2 and error_line(err) == (f"error: {broken}: broken symlink (it points to "
                                             f"{tmp_path / 'gone.csv'}, which is not there)")
    config_loop = tmp_path / "cfg-loop.yaml"
    config_loop.symlink_to(config_loop)
    code, err = run_cli(capsys, ["train", config_loop])
    assert code == 2 and "symlink loop" in error_line(err)


def test_a_tab_separated_file_named_csv_gets_a_hint(tmp_path, tiny_model_dir, capsys):
    tsv = tmp_path / "data.csv"
    pd.DataFrame(sentiment_rows(40)).to_csv(tsv, sep="\t", index=False)
    code, err = run_cli(capsys, ["train", write_config(tmp_path, tiny_model_dir, tsv)])
    assert code == 2
    assert error_line(err) == (f"error: {tsv}, line 1: one column named 'text\\tlabel\\tfilm': the file looks "
                               "tab-separated; name it .tsv")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_the_python_api_refuses_a_batch_size_below_1_in_one_line(tmp_path, bad):
    # checked before the run is loaded: a bad size never reaches batching (0 failed there with a ValueError)
    calls = [lambda: tunesmith.evaluate(tmp_path / "run", tmp_path / "data.csv", batch_size=bad),
             lambda: tunesmith.predict(tmp_path / "run", texts=["a review"], batch_size=bad),
             lambda: export(tmp_path / "run", batch_size=bad)]
    for call in calls:
        with pytest.raises(TunesmithError, match=r"^batch_size: give a whole number, 1 or more \(got "):
            call()
