import time
from pathlib import Path

import pytest

from tunesmith import inputs
from tunesmith.config import Config, config_to_yaml, load_config, parse_override_value
from tunesmith.errors import TunesmithError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  dataset: rotten_tomatoes\n"), {"train.lr": 3e-5, "model.max_length": 64})
    assert cfg.model.name == "minilm-l6"
    assert cfg.train.lr == 3e-5 and cfg.model.max_length == 64
    assert cfg.train.batch_size == "auto" and cfg.train.warmup_ratio == 0.1


@pytest.mark.parametrize("text,value", [("3e-5", 3e-5), ("true", True), ("null", None), ("16", 16),
                                        ("cosine", "cosine"), ("[a, b]", ["a", "b"])])
def test_parse_override_value(text, value):
    assert parse_override_value(text) == value


def test_unknown_key_suggests_and_gives_line(tmp_path):
    path = write(tmp_path, "data:\n  dataset: rotten_tomatoes\ntrain:\n  epochs: 1\n  lrr: 0.1\n")
    with pytest.raises(TunesmithError) as err:
        load_config(path)
    assert str(err.value) == f"{path}, line 5: unknown key 'train.lrr' (did you mean 'train.lr'?)"


def test_bad_value_names_key_and_line(tmp_path):
    path = write(tmp_path, "data:\n  dataset: x\ntrain:\n  lr: fast\n")
    with pytest.raises(TunesmithError, match=r"line 4: train.lr: .*number.*'fast'"):
        load_config(path)


def test_a_bad_override_from_python_is_named_as_the_override_not_the_file(tmp_path):
    path = write(tmp_path, "data:\n  dataset: x\ntrain:\n  lr: 0.1\n")
    with pytest.raises(TunesmithError) as err:
        load_config(path, {"train.lr": "abc"})
    assert str(err.value).startswith("override train.lr='abc': train.lr: Input should be a valid number")


@pytest.mark.parametrize("text", ["false", "off", "no", "False"])
def test_test_false_means_no_test_split_and_is_kept(tmp_path, text):
    """`data.test: false` (YAML off / no too) skips even a catalog dataset's own test split (None means: use it);
    the saved run config keeps it, as do an override and in-memory data's config."""
    cfg = load_config(write(tmp_path, f"data:\n  dataset: chatterbot\n  test: {text}\n"))
    assert cfg.data.test is False
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    assert "  test: false\n" in saved.read_text() and load_config(saved, saved=True).data.test is False
    overridden = load_config({"data": {"dataset": "chatterbot"}}, {"data.test": parse_override_value(text)})
    assert overridden.data.test is False
    with inputs.in_memory_data({"data": {"train": [{"text": "a", "label": "x"}], "test": False}}) as (config, _):
        assert load_config(config).data.test is False
    assert load_config({"data": {"dataset": "chatterbot", "test": None}}).data.test is None


@pytest.mark.parametrize("split", ["test", "validation"])
@pytest.mark.parametrize("text,shown", [("3", "3"), ("0", "0"), ("yes", "True"), ("[a.csv]", "['a.csv']")])
def test_test_and_validation_take_a_file_or_false_only(tmp_path, split, text, shown):
    path = write(tmp_path, f"data:\n  dataset: chatterbot\n  {split}: {text}\n")
    with pytest.raises(TunesmithError) as err:
        load_config(path)
    expected = f"{path}, line 3: data.{split}: expected a file path, or false for no {split} split (got {shown})"
    assert str(err.value) == expected


@pytest.mark.parametrize("text", ["false", "off"])
def test_validation_false_holds_nothing_out_and_is_kept(tmp_path, text):
    """`data.validation: false`: no validation split at all, neither a catalog dataset's own nor one carved out
    of train (as validation_fraction 0); the saved run config keeps it."""
    cfg = load_config(write(tmp_path, f"data:\n  dataset: chatterbot\n  validation: {text}\n"))
    assert cfg.data.validation is False and not cfg.data.holds_out
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    assert "  validation: false\n" in saved.read_text() and load_config(saved, saved=True).data.validation is False
    assert load_config({"data": {"dataset": "chatterbot"}}).data.holds_out


def test_invalid_choice(tmp_path):
    with pytest.raises(TunesmithError, match="train.precision"):
        load_config(write(tmp_path, "data:\n  dataset: x\ntrain:\n  precision: fp8\n"))


def test_missing_data(tmp_path):
    with pytest.raises(TunesmithError, match="set data.dataset"):
        load_config(write(tmp_path, "data:\n  text_column: t\n"))


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "data:\n  dataset: x\n train: [\n")
    with pytest.raises(TunesmithError, match=r"c.yaml, line \d+, column \d+"):
        load_config(path)


def test_missing_and_empty_config(tmp_path):
    with pytest.raises(TunesmithError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(TunesmithError, match="config file is empty"):
        load_config(write(tmp_path, ""))


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert path.read_text().startswith("#"), "each shipped config starts with a header showing its launch command"
    assert "tunesmith train" in path.read_text().split("\n\n")[0]


@pytest.mark.parametrize("text,first,second,key", [
    ("data:\n  dataset: x\ntrain:\n  lr: 0.5\n  max_steps: 2\ntrain:\n  batch_size: 8\n", 3, 6, "train"),
    ("data:\n  dataset: x\ntrain:\n  lr: 0.5\n  epochs: 1\n  lr: 0.1\n", 4, 6, "lr"),
    ("data: {dataset: x}\ntrain: {lr: 0.5, lr: 0.1}\n", 2, 2, "lr"),
], ids=["top-level", "nested", "flow"])
def test_duplicate_key_is_an_error_naming_both_lines(tmp_path, text, first, second, key):
    path = write(tmp_path, text)
    with pytest.raises(TunesmithError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}, line {second}, column ")
    assert f"duplicate key '{key}' (first on line {first})" in str(err.value)


def test_merge_keys_may_be_overridden(tmp_path):
    """`<<: *base` then a key of base is YAML's way to override, not a duplicate."""
    text = "data: {dataset: x}\ntrain:\n  <<: {lr: 0.5, epochs: 1}\n  lr: 0.1\n"
    assert load_config(write(tmp_path, text)).train.lr == 0.1


def test_alias_bomb_is_refused_fast_with_one_short_line(tmp_path):
    """Nine levels of nine aliases over a list of nine: 9**10 (3.5 billion) values once expanded, from 472
    bytes of YAML."""
    names = "abcdefghij"
    levels = ["  - &a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"  - &{names[i]} [{', '.join(['*' + names[i - 1]] * 9)}]" for i in range(1, 10)]
    path = write(tmp_path, "data: {dataset: x}\ntrain:\n lr:\n" + "\n".join(" " + x for x in levels) + "\n")
    started = time.perf_counter()
    with pytest.raises(TunesmithError) as err:
        load_config(path)
    assert time.perf_counter() - started < 2
    message = str(err.value)
    assert "aliases" in message and len(message) < 300 and "\n" not in message


def test_long_values_are_cut_short_in_errors(tmp_path):
    path = write(tmp_path, "data: {dataset: x}\ntrain:\n  lr: " + "z" * 100_000 + "\n")
    with pytest.raises(TunesmithError) as err:
        load_config(path)
    assert "train.lr" in str(err.value) and "zzz..." in str(err.value) and len(str(err.value)) < 400


def test_deeply_nested_value_is_an_error_not_a_recursion_traceback(tmp_path):
    path = write(tmp_path, "data: {dataset: x}\ntrain: {lr: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(TunesmithError, match="c.yaml: values nested too deeply"):
        load_config(path)
