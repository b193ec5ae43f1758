"""tunesmith serve: every status code (200, 413, 415, 422, 503) through FastAPI's TestClient, the model loaded
once, text / NER / image inputs, the ONNX backend; and a real uvicorn server on a free loopback port for
micro-batching of concurrent requests and a graceful shutdown that finishes the request in flight."""

from __future__ import annotations

import base64
import http.client
import io
import json
import signal
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import TUNESMITH
from tunesmith import inference
from tunesmith.config import ServeConfig
from tunesmith.export import export
from tunesmith.serve import create_app, is_loopback, model_workers


def _client(run, **settings) -> TestClient:
    return TestClient(create_app(run, ServeConfig(**settings)))


def test_predict_health_metadata_docs_and_the_model_loads_once(tiny_run, monkeypatch):
    run, _ = tiny_run("text_classification")
    loads = []
    original = inference.LoadedRun.__init__

    def counted(self, *args, **kwargs):
        loads.append(1)
        original(self, *args, **kwargs)
    monkeypatch.setattr(inference.LoadedRun, "__init__", counted)
    with _client(run) as client:
        one = client.post("/predict", json={"inputs": "a great and wonderful film"})
        assert one.status_code == 200
        (row,) = one.json()["predictions"]
        assert row["predicted_label"] == "pos" and row["prob_pos"] + row["prob_neg"] == pytest.approx(1.0)
        many = client.post("/predict", json={"inputs": ["awful and boring", "superb fun"]}).json()["predictions"]
        assert [r["predicted_label"] for r in many] == ["neg", "pos"]
        assert client.get("/health").json()["status"] == "ok"
        meta = client.get("/metadata").json()
        assert meta["task"] == "text_classification" and meta["labels"] == ["neg", "pos"]
        assert meta["max_length"] == 32 and meta["backend"] == "torch" and meta["input"] == "text"
        assert "/predict" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200
    assert len(loads) == 1


@pytest.mark.parametrize("body, field", [
    (b"{\"inputs\": [\"good\",", "body: malformed JSON"),
    (json.dumps({"input": "good"}).encode(), "inputs: Field required; input: Extra inputs are not permitted"),
    (json.dumps({"inputs": 5}).encode(), "inputs: Input should be a valid list"),
    (json.dumps({"inputs": ["good", 3]}).encode(), "inputs[1]: Input should be a valid string"),
    (json.dumps({"inputs": []}).encode(), "inputs: empty list"),
    (json.dumps({"inputs": ["good", "  "]}).encode(), "inputs[1]: empty text"),
    (b"\xff\xfe", "body: malformed JSON"),
])
def test_malformed_json_or_a_wrong_field_is_422_naming_it(tiny_run, body, field):
    run, _ = tiny_run("text_classification")
    with _client(run) as client:
        answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert answer.json()["detail"].startswith(field), answer.json()


def test_limits_are_413_and_other_content_types_415(tiny_run):
    run, _ = tiny_run("text_classification")
    with _client(run, max_inputs_per_request=3, max_chars_per_input=20) as client:
        many = client.post("/predict", json={"inputs": ["good"] * 4})
        assert many.status_code == 413 and "4 in one request" in many.json()["detail"]
        assert "at most 3" in many.json()["detail"]
        long = client.post("/predict", json={"inputs": ["good", "x" * 21]})
        assert long.status_code == 413 and long.json()["detail"].startswith("inputs[1]: 21 characters")
        huge = client.post("/predict", content=b"[" + b" " * 10**6 + b"]", headers={"content-type": "application/json"})
        assert huge.status_code == 413 and huge.json()["detail"].startswith("body: ")
        assert client.post("/predict", json={"inputs": ["x" * 20]}).status_code == 200
        plain = client.post("/predict", content=b"good", headers={"content-type": "text/plain"})
        assert plain.status_code == 415
        upload = client.post("/predict", files={"files": ("a.txt", b"good")})
        assert upload.status_code == 415 and "takes text" in upload.json()["detail"]


def test_a_full_queue_is_503_with_retry_after(tiny_run):
    run, _ = tiny_run("text_classification")
    with _client(run, max_queue=4, max_inputs_per_request=4, batch_window_ms=1500, retry_after_s=2) as client:
        first: list = []
        waiting = threading.Thread(target=lambda: first.append(client.post("/predict", json={"inputs": ["good"] * 3})))
        waiting.start()
        deadline = time.time() + 10
        while client.get("/health").json()["queued"] < 3 and time.time() < deadline:
            time.sleep(0.01)
        busy = client.post("/predict", json={"inputs": ["bad", "dull"]})  # 3 + 2 > 4
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert "server busy" in busy.json()["detail"]
        waiting.join()
        assert first[0].status_code == 200 and len(first[0].json()["predictions"]) == 3
        assert client.post("/predict", json={"inputs": ["bad", "dull"]}).status_code == 200  # room again


def test_one_bad_input_in_a_batch_fails_only_its_request(tiny_run, monkeypatch):
    run, _ = tiny_run("text_classification")
    with _client(run, batch_window_ms=300, workers=1) as client:  # one worker: all three share one call
        batcher = client.app.state.batcher
        real = batcher.predict

        def predict(inputs):  # an input the task refuses (a stand-in for any reader error)
            if "poison" in inputs:
                raise inference.TunesmithError("texts, row 1, column 'text': poisoned")
            return real(inputs)
        monkeypatch.setattr(batcher, "predict", predict)
        answers: dict = {}
        threads = [threading.Thread(target=lambda t=t: answers.__setitem__(t, client.post("/predict", json={"inputs": t})))
                   for t in ("good fun", "poison", "awful")]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert answers["poison"].status_code == 422 and "poisoned" in answers["poison"].json()["detail"]
        assert answers["good fun"].status_code == 200 and answers["awful"].status_code == 200
        assert client.get("/health").json()["largest_batch"] == 3  # they did share a batch first


def test_workers_run_model_calls_at_once(tiny_run, monkeypatch):
    run, _ = tiny_run("text_classification")
    with _client(run, workers=2, batch_window_ms=0) as client:
        batcher = client.app.state.batcher
        real = batcher.predict
        both_running = threading.Barrier(2, timeout=20)  # broken (an error) unless two calls overlap

        def predict(inputs):
            both_running.wait()
            return real(inputs)
        monkeypatch.setattr(batcher, "predict", predict)
        answers: list = []
        threads = [threading.Thread(target=lambda t=t: answers.append(client.post("/predict", json={"inputs": t})))
                   for t in ("good fun", "awful")]
        threads[0].start()
        deadline = time.time() + 10  # the first request is in its model call before the second is sent
        while client.get("/health").json()["batches"] < 1 and time.time() < deadline:
            time.sleep(0.01)
        threads[1].start()
        [t.join() for t in threads]
        assert sorted(a.status_code for a in answers) == [200, 200]
        assert client.get("/health").json()["batches"] == 2
        assert client.get("/metadata").json()["batching"]["workers"] == 2


def test_workers_share_what_waits(tiny_run):
    run, _ = tiny_run("text_classification")
    # a window long enough for the 4 threads' requests to arrive on a loaded machine (with 0.5 s, one came late
    # in a CI run with other jobs beside it: 2 + 1 + 1)
    with _client(run, workers=2, batch_window_ms=3_000) as client:
        answers: list = []
        threads = [threading.Thread(target=lambda t=t: answers.append(client.post("/predict", json={"inputs": t})))
                   for t in ("good fun", "awful", "superb", "dull")]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert [a.status_code for a in answers] == [200] * 4
        health = client.get("/health").json()
        assert (health["batches"], health["largest_batch"]) == (2, 2)  # 2 + 2 at once, not 4 in one call


def test_a_full_batch_shared_among_workers_starts_every_share_at_once(tiny_run):
    run, _ = tiny_run("text_classification")
    # 4 requests fill max_batch_size 4: no need to wait out the window, and the 2 workers take 2 each at once.
    # Before, the second share waited a whole window more and then went as 1 + 1 (batches 2, 1, 1)
    with _client(run, workers=2, max_batch_size=4, batch_window_ms=10_000) as client:
        answers: list = []
        threads = [threading.Thread(target=lambda t=t: answers.append(client.post("/predict", json={"inputs": t})))
                   for t in ("good fun", "awful", "superb", "dull")]
        started = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        seconds = time.perf_counter() - started
        assert [a.status_code for a in answers] == [200] * 4
        health = client.get("/health").json()
        assert (health["batches"], health["largest_batch"]) == (2, 2)
        assert seconds < 5, seconds  # answered when the 4th arrived, not a 10 s window later


def test_workers_auto_fill_the_cores(monkeypatch):
    import torch
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert model_workers("auto", torch.device("cpu")) == 4  # OMP_NUM_THREADS=1: one call per core
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert model_workers("auto", torch.device("cpu")) == 1  # one call already uses every core
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert model_workers("auto", torch.device("cpu")) == 1
    assert model_workers("auto", torch.device("cuda")) == 1
    assert model_workers(3, torch.device("cpu")) == 3


def test_ner_and_the_onnx_backend(tiny_run, tmp_path):
    run, _ = tiny_run("token_classification")
    with _client(run) as client:
        torch_rows = client.post("/predict", json={"inputs": ["alice met bob in paris"]}).json()["predictions"]
    assert isinstance(torch_rows[0]["entities"], list) and torch_rows[0]["tokens"] == ["alice", "met", "bob", "in", "paris"]
    export(run)
    with _client(run, backend="onnx") as client:
        assert client.get("/metadata").json()["backend"] == "onnx"
        onnx_rows = client.post("/predict", json={"inputs": ["alice met bob in paris"]}).json()["predictions"]
    assert onnx_rows[0]["predicted_tags"] == torch_rows[0]["predicted_tags"]


def _png(size: int = 16, horizontal: bool = True) -> bytes:
    from PIL import Image
    wave = (np.arange(size) // 3) % 2 * 200
    pixels = np.tile(wave[:, None] if horizontal else wave[None, :], (1, size) if horizontal else (size, 1))
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_images_as_uploads_or_base64(tiny_run):
    run, _ = tiny_run("image_classification")
    png = _png()
    with _client(run, max_image_bytes=len(png) + 10) as client:
        up = client.post("/predict", files=[("files", ("h.png", png, "image/png")), ("files", ("v.png", _png(horizontal=False), "image/png"))])
        assert up.status_code == 200, up.json()
        rows = up.json()["predictions"]
        assert [r["image"] for r in rows] == ["h.png", "v.png"] and rows[0]["predicted_label"] in ("horizontal", "vertical")
        b64 = client.post("/predict", json={"inputs": base64.b64encode(png).decode()})
        assert b64.status_code == 200 and b64.json()["predictions"][0]["image"] == "inputs[0]"
        assert b64.json()["predictions"][0]["prob_horizontal"] == pytest.approx(rows[0]["prob_horizontal"])
        uri = client.post("/predict", json={"inputs": "data:image/png;base64," + base64.b64encode(png).decode()})
        assert uri.status_code == 200
        assert client.get("/metadata").json()["max_length"] is None
        bad = client.post("/predict", json={"inputs": ["not base64 !"]})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("inputs[0]: not base64")
        text = client.post("/predict", json={"inputs": [base64.b64encode(b"hello").decode()]})
        assert text.status_code == 422 and "not a readable image" in text.json()["detail"]
        big = client.post("/predict", files={"files": ("big.png", png + b"\0" * 11, "image/png")})
        assert big.status_code == 413 and big.json()["detail"].startswith("big.png: image of")
        field = client.post("/predict", files={"image": ("h.png", png, "image/png")})
        assert field.status_code == 422 and "form field 'image'" in field.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, inputs, timeout: float = 30) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", json.dumps({"inputs": inputs}).encode(),
                                     {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_real_server_batches_concurrent_requests_and_shuts_down_gracefully(tiny_run, cli_env):
    run, _ = tiny_run("text_classification")
    port = _free_port()
    server = subprocess.Popen(TUNESMITH + ["serve", str(run), "--port", str(port), "--serve.batch_window_ms", "400"],
                              env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    assert json.loads(answer.read())["status"] == "ok"
                    break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.1)
        # answers leave at once: before the listening socket said IPPROTO_TCP, asyncio left Nagle's algorithm on
        # for every connection and each answer waited ~40 ms for the client's delayed ACK (44 ms for /health)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        seconds = []
        for _ in range(15):
            started = time.perf_counter()
            connection.request("GET", "/health")
            connection.getresponse().read()
            seconds.append(time.perf_counter() - started)
        connection.close()
        assert sorted(seconds)[7] < 0.03, seconds

        answers: list = []
        threads = [threading.Thread(target=lambda i=i: answers.append(_post(port, [f"good fun {i}", "awful"])))
                   for i in range(12)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert [code for code, _ in answers] == [200] * 12
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            health = json.loads(answer.read())
        assert health["largest_batch"] > 2 and health["batches"] < 12  # requests shared model calls

        # SIGTERM while a request waits in its batch window: it is still answered, then the server exits 0
        in_flight: list = []
        waiter = threading.Thread(target=lambda: in_flight.append(_post(port, ["superb"])))
        waiter.start()
        time.sleep(0.15)
        server.send_signal(signal.SIGTERM)
        waiter.join()
        assert in_flight[0][0] == 200 and in_flight[0][1]["predictions"][0]["predicted_label"] == "pos"
        assert server.wait(timeout=30) == 0
        err = server.stderr.read()
        assert f"http://127.0.0.1:{port}" in err and "server stopped" in err and "Traceback" not in err, err
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_loopback_by_default_and_bad_starts_are_one_line(tiny_run, tmp_path, capsys):
    from tunesmith import cli
    assert ServeConfig().host == "127.0.0.1" and is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    run, _ = tiny_run("text_classification")
    # the shared run may carry an export from test_export: a copy without it (else this would serve forever)
    unexported = tmp_path / "unexported"
    shutil.copytree(run, unexported, ignore=shutil.ignore_patterns("onnx"))
    for argv, message in (
        (["serve", str(tmp_path)], "not a tunesmith run folder"),
        (["serve", str(run), "--serve.max_queue", "8"], "max_inputs_per_request (64) is larger than max_queue (8)"),
        (["serve", str(unexported), "--backend", "onnx", "--port", "0"], "no ONNX export"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main(["serve", str(run), "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_serve_keeps_onednns_kernel_cache_small(tiny_run, monkeypatch):
    """A server meets a new input shape with nearly every call; oneDNN's default cache of 1,024 shapes' kernels
    grew a MiniLM server by ~1.5 GB. serve sets a small one unless the user set theirs."""
    import os
    import uvicorn
    from tunesmith import serve as serve_module
    run, _ = tiny_run("text_classification")
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert serve_module.serve(run, {"serve.port": 0}) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    assert serve_module.serve(run, {"serve.port": 0}) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"


def test_model_calls_pad_widths_to_a_multiple_and_give_freed_memory_back(tiny_run, monkeypatch):
    """Each new (batch, width) shape grew a CPU PyTorch server's memory; widths rounded up to 8 tokens (auto) and
    malloc_trim after each call kept it flat (bench/README.md). The answers are those of unpadded calls."""
    import torch
    from tunesmith import serve as serve_module
    from tunesmith.serve import pad_width_to
    run, _ = tiny_run("text_classification")
    texts = ["good", "a great and wonderful film with a story", "awful and boring"]
    with _client(run, workers=1) as client:
        exact = client.post("/predict", json={"inputs": texts}).json()["predictions"]  # warm: loaded, first call
    trims, widths = [], []
    monkeypatch.setattr(serve_module, "_MALLOC_TRIM", lambda pad: trims.append(pad))
    with _client(run, workers=1) as client:
        model = client.app.state.model
        assert client.get("/metadata").json()["batching"]["pad_to_multiple_of"] == 8 == model.pad_to
        model.run.model.register_forward_pre_hook(lambda module, args, kwargs: widths.append(
            kwargs["input_ids"].shape[1]), with_kwargs=True)
        padded = client.post("/predict", json={"inputs": texts}).json()["predictions"]
    assert widths and all(w % 8 == 0 for w in widths) and trims == [0]
    for a, b in zip(exact, padded):
        assert a["predicted_label"] == b["predicted_label"] and a["prob_pos"] == pytest.approx(b["prob_pos"], abs=1e-3)
    # explicit values win; ONNX Runtime (flat without it) and GPUs keep the run's own widths
    assert pad_width_to(ServeConfig(pad_to_multiple_of=4), torch.device("cpu"), "auto") == 4
    assert pad_width_to(ServeConfig(backend="onnx"), torch.device("cpu"), "auto") == 1
    assert pad_width_to(ServeConfig(), torch.device("cuda"), "auto") == 16
