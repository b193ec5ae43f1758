import json

import pandas as pd
import pytest

from tunesmith.config import Config, load_config
from tunesmith.data import read_table, sort_labels, text_values
from tunesmith.errors import TunesmithError
from tunesmith.tasks.classes import LabelSpace
from tunesmith.tasks.classes import label_space as classes_label_space
from tunesmith.tasks.text_classification import read_examples


def data_cfg(**kw) -> Config:
    return load_config({"data": {"train": "x.csv", **kw}})


def label_space(examples, cfg: Config) -> LabelSpace:
    return classes_label_space(examples.label_names, cfg.data, str(examples.table.path))


def test_csv_tsv_jsonl_parquet_read_the_same(tmp_path):
    df = pd.DataFrame({"text": ["a b", "c, \"d\"", "e\nf"], "label": ["x", "y", "x"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "d.parquet")
    for suffix in ("csv", "tsv", "jsonl", "parquet"):
        table = read_table(tmp_path / f"d.{suffix}")
        assert table.df["text"].tolist() == df["text"].tolist(), suffix
    # a quoted field spanning two lines: the next row's line number accounts for it
    assert read_table(tmp_path / "d.csv").line_of_row == [2, 3, 4]


def test_missing_file(tmp_path):
    with pytest.raises(TunesmithError, match=r"nope.csv: file not found"):
        read_table(tmp_path / "nope.csv")


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(TunesmithError, match="e.csv: file is empty"):
        read_table(tmp_path / "e.csv")
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(TunesmithError, match="h.csv: no data rows"):
        read_table(tmp_path / "h.csv")


def test_malformed_csv_row_names_line(tmp_path):
    (tmp_path / "m.csv").write_text("text,label\nfine,pos\ntoo,many,fields\n")
    with pytest.raises(TunesmithError) as err:
        read_table(tmp_path / "m.csv")
    assert str(err.value) == f"{tmp_path / 'm.csv'}, line 3: expected 2 fields ('text,label'), found 3"


def test_non_utf8_names_line_and_byte(tmp_path):
    (tmp_path / "b.csv").write_bytes(b"text,label\nok,pos\ncaf\xe9 latte,neg\n")
    with pytest.raises(TunesmithError, match=r"b.csv, line 3, byte 4: not valid UTF-8 \(byte 0xe9\)"):
        read_table(tmp_path / "b.csv")


def test_missing_column_suggests_closest(tmp_path):
    (tmp_path / "c.csv").write_text("txt,label\nhello,pos\n")
    with pytest.raises(TunesmithError, match=r"no text column 'text' \(columns: txt, label\); did you mean 'txt'\?"):
        text_values(read_table(tmp_path / "c.csv"), "text")


def test_empty_text_names_line_and_column(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nhello,pos\n   ,neg\n")
    with pytest.raises(TunesmithError) as err:
        text_values(read_table(tmp_path / "t.csv"), "text")
    assert str(err.value) == f"{tmp_path / 't.csv'}, line 3, column 'text': empty text"


def test_non_string_text_in_jsonl(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "hi", "label": 1}\n\n{"text": 42, "label": 0}\n')
    with pytest.raises(TunesmithError, match=r"t.jsonl, line 3, column 'text': text must be a string, got 42"):
        text_values(read_table(tmp_path / "t.jsonl"), "text")


def test_invalid_json_line(tmp_path):
    (tmp_path / "j.jsonl").write_text('{"text": "hi"}\n{"text": \n')
    with pytest.raises(TunesmithError, match=r"j.jsonl, line 2, char \d+: invalid JSON"):
        read_table(tmp_path / "j.jsonl")


def test_one_class_only(tmp_path):
    (tmp_path / "o.csv").write_text("text,label\na,pos\nb,pos\n")
    ex = read_examples(tmp_path / "o.csv", data_cfg(), None)
    with pytest.raises(TunesmithError, match=r"o.csv: column 'label' has only 1 class \('pos'\)"):
        label_space(ex, data_cfg())


def test_unseen_label_at_evaluation(tmp_path):
    (tmp_path / "u.csv").write_text("text,label\na,pos\nb,neutral\n")
    with pytest.raises(TunesmithError) as err:
        read_examples(tmp_path / "u.csv", data_cfg(), LabelSpace("single_label", ["neg", "pos"]))
    assert str(err.value) == (f"{tmp_path / 'u.csv'}, line 3, column 'label': label 'neutral' was not seen "
                              "in training (known: neg, pos)")


def test_int_and_string_labels_normalise(tmp_path):
    (tmp_path / "i.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "0"}\n{"text": "c", "label": 10}\n')
    ex = read_examples(tmp_path / "i.jsonl", data_cfg(), None)
    space = label_space(ex, data_cfg())
    assert space.names == ["0", "1", "10"]


def test_multi_label_from_lists_and_separated_strings(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "a", "label": ["x", "y"]}, {"text": "b", "label": []}, {"text": "c", "label": ["z"]}]))
    cfg = data_cfg(problem_type="multi_label")
    ex = read_examples(tmp_path / "m.jsonl", cfg, None)
    assert label_space(ex, cfg).names == ["x", "y", "z"]
    assert ex.targets.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    (tmp_path / "m.csv").write_text("text,label\na,x|y\nb,\nc,z\n")
    assert read_examples(tmp_path / "m.csv", cfg, None).targets.tolist() == ex.targets.tolist()


def test_regression_target_must_be_number(tmp_path):
    (tmp_path / "r.csv").write_text("text,label\na,0.5\nb,high\n")
    with pytest.raises(TunesmithError, match=r"r.csv, line 3, column 'label': regression target must be a finite number"):
        read_examples(tmp_path / "r.csv", data_cfg(problem_type="regression"), None)


def test_sort_labels():
    assert sort_labels({"10", "2", "1"}) == ["1", "2", "10"]
    assert sort_labels({"pos", "neg"}) == ["neg", "pos"]


def test_csv_cell_over_the_csv_modules_128k_limit_reads(tmp_path):
    import csv

    long_text = ("good film, " * 20_000).strip() + "\nsecond line"  # 220 KB, commas and a newline inside
    path = tmp_path / "big.csv"
    pd.DataFrame({"text": ["short", long_text, "after"], "label": ["pos", "neg", "pos"]}).to_csv(path, index=False)
    before = csv.field_size_limit(131072)  # the module's default, whatever an earlier test set
    try:
        table = read_table(path)
    finally:
        csv.field_size_limit(max(before, csv.field_size_limit()))
    assert table.df["text"].tolist() == ["short", long_text, "after"]
    assert table.line_of_row == [2, 3, 5]


def test_jsonl_is_read_a_line_at_a_time_not_held_whole(tmp_path):
    """A large JSONL file used to be held as bytes, text and a list of lines at once (3.9x its size in
    Python allocations at the peak); read a line at a time it stays under 2x."""
    import json
    import tracemalloc

    from tunesmith.data import read_table
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(20_000):
            f.write(json.dumps({"text": "word " * 100 + str(i), "label": "pos" if i % 2 else "neg"}) + "\n")
        f.write(json.dumps({"text": "a late column", "label": "pos", "group": "g1"}) + "\n")
    tracemalloc.start()
    try:
        table = read_table(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(table.df) == 20_001 and list(table.df.columns) == ["text", "label", "group"]
    assert table.df["group"].isna().sum() == 20_000 and table.df["group"].iloc[-1] == "g1"
    assert table.line_of_row[-1] == 20_001
    assert peak < 2 * path.stat().st_size, f"peak {peak / path.stat().st_size:.2f}x the file's size"
