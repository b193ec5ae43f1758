from pathlib import Path

import pytest

from tunesmith.config import Config, load_config, parse_override_value
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
