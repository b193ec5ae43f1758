"""tunesmith export (ONNX) and the ONNX Runtime backend of predict / evaluate, on every registered task:
the export checks itself against PyTorch (max abs diff, int8 metric change), runs any batch size and
length, predicts what PyTorch predicts, and refuses what it cannot do with one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
import pytest

import tunesmith
from tunesmith import cli, export as export_mod
from tunesmith.export import export
from tunesmith.tasks import TASKS
from tunesmith.tasks.base import exportable


EXPORTABLE = sorted(name for name in TASKS if exportable(TASKS[name]))


def test_the_classification_tasks_export_and_language_models_are_refused(tiny_run, tmp_path):
    assert EXPORTABLE == ["image_classification", "text_classification", "token_classification"]
    run, _ = tiny_run("language_modeling")
    with pytest.raises(tunesmith.TunesmithError, match="task language_modeling: export to ONNX is not available"):
        export(run, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_matches_pytorch_and_predicts_the_same(name, tiny_run, tmp_path):
    run, case = tiny_run(name)
    report = export(run, tmp_path / "onnx", quantize="int8")
    saved = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert saved["onnx_fp32"]["max_abs_diff"] == report["onnx_fp32"]["max_abs_diff"] < 1e-4
    assert saved["examples"] == case["n_test"] and saved["quantize"] == "int8"
    metric = case["metric"]
    assert saved["onnx_fp32"][metric] == pytest.approx(saved["torch"][metric], abs=1e-9)
    assert saved["onnx_int8"]["change"][metric] == pytest.approx(saved["onnx_int8"][metric] - saved["torch"][metric])
    assert 0 < saved["onnx_int8"]["max_abs_diff"] < 1.0  # int8 really ran: close, not identical

    # dynamic batch (and sequence, for token inputs) axes, as export.json says
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == saved["inputs"]
    assert all(d[0] == "batch" for d in dims.values())
    assert all(d[1] == "sequence" for d in dims.values() if len(d) == 2)
    int8_types = {t.data_type for t in graph.initializer}
    assert onnx.TensorProto.INT8 in int8_types

    # predict with ONNX Runtime on batch sizes and lengths the trace never saw
    torch_frame = tunesmith.predict(run, case["test"], precision="fp32", batch_size=7)
    plain = export(run, tmp_path / "fp32")
    assert "onnx_int8" not in plain
    onnx_frame = tunesmith.predict(tmp_path / "fp32", case["test"], batch_size=7, backend="onnx")
    label = next(c for c in torch_frame.columns if c.startswith("predicted_"))
    assert onnx_frame[label].tolist() == torch_frame[label].tolist()
    probs = [c for c in torch_frame.columns if c.startswith("prob_")]
    if probs:
        assert np.abs(onnx_frame[probs].to_numpy() - torch_frame[probs].to_numpy()).max() < 1e-5
    metrics = tunesmith.evaluate(tmp_path / "fp32", case["test"], backend="onnx")
    assert metrics[metric] == pytest.approx(saved["onnx_fp32"][metric], abs=1e-9)


def test_cli_export_default_folder_and_predict_backend_onnx(tiny_run, tmp_path, capsys):
    run, case = tiny_run("text_classification")
    assert cli.main(["export", str(run), "--batch-size", "5"]) == 0
    out = capsys.readouterr()
    assert "onnx fp32" in out.out and "max abs diff" in out.out and f"wrote {run / 'onnx'}" in out.err
    assert cli.main(["predict", str(run), "--backend", "onnx", "--text", "a great film"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["predicted_label"] in ("pos", "neg") and row["prob_pos"] + row["prob_neg"] == pytest.approx(1.0)
    preds = tmp_path / "preds.csv"
    assert cli.main(["predict", str(run), "--backend", "onnx", "--input", str(case["test"]),
                     "--output", str(preds)]) == 0
    assert len(pd.read_csv(preds)) == case["n_test"]


@pytest.fixture
def text_run(tiny_run, capsys):
    """The shared text classification run, its training output (when this test is the first to ask for it) kept
    out of what the test captures: the one-line checks hold whatever order the tests run in."""
    run_and_case = tiny_run("text_classification")
    capsys.readouterr()
    return run_and_case


def _error(argv: list[str], capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_export_bad_inputs_are_one_line(text_run, tmp_path, capsys, monkeypatch):
    run, _ = text_run
    assert "not a tunesmith run folder" in _error(["export", str(tmp_path)], capsys)
    assert "no ONNX export" in _error(["predict", str(tmp_path), "--backend", "onnx", "--text", "x"], capsys)
    # a labelled file for the parity check must be labelled
    unlabelled = tmp_path / "unlabelled.csv"
    pd.DataFrame({"text": ["good film"]}).to_csv(unlabelled, index=False)
    assert "unlabelled.csv" in _error(["export", str(run), "--data", str(unlabelled), "--output",
                                       str(tmp_path / "x")], capsys)
    assert not (tmp_path / "x").exists()
    # an export that does not match PyTorch is refused and leaves nothing behind
    monkeypatch.setattr(export_mod, "_max_abs_diff", lambda a, b: 0.5)
    assert "differ from PyTorch's by up to 0.5" in _error(["export", str(run), "--output", str(tmp_path / "y")],
                                                          capsys)
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))
    monkeypatch.undo()
    # a damaged model file
    export(run, tmp_path / "z")
    (tmp_path / "z" / "model.onnx").write_bytes(b"not onnx")
    assert "not a readable ONNX model" in _error(["predict", str(tmp_path / "z"), "--backend", "onnx", "--text",
                                                  "x"], capsys)


def test_export_without_a_test_split_needs_data(text_run, tmp_path, capsys):
    run, case = text_run
    config = run / "model" / "tunesmith_config.yaml"
    saved = config.read_text()
    try:
        config.write_text(saved.replace(f"test: {case['test']}", "test: null"))
        assert "give --data FILE" in _error(["export", str(run), "--output", str(tmp_path / "o")], capsys)
        report = export(run, tmp_path / "o", data=case["test"])
        assert report["examples"] == case["n_test"]
    finally:
        config.write_text(saved)
