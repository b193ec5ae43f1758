"""`tunesmith serve RUN`: a trained run behind HTTP (FastAPI + uvicorn); the model loads once, at start.

POST /predict takes one input or a list: JSON {"inputs": "a text" | ["text", ...]} (images: base64 strings
there, or multipart file uploads). Requests are micro-batched: the first waiting request waits up to
serve.batch_window_ms for others, and up to serve.max_batch_size inputs run in one model call, in one worker
thread beside the event loop, so throughput rises with load. At most serve.max_queue inputs wait or run; past
that a request gets 503 with Retry-After instead of growing memory. Too many inputs or too long an input is
413, a malformed body or a wrong field 422 naming the field. SIGTERM / Ctrl-C stops accepting and finishes
the requests in flight (uvicorn's graceful shutdown) before the batcher stops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import ctypes
import email.parser
import email.policy
import io
import ipaddress
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .config import ServeConfig, load_config
from .errors import TunesmithError
from .inference import RUN_INFO, load_run, pad_multiple
from .tasks.base import exportable


class Busy(Exception):
    """The queue is full: the request is answered 503 with Retry-After."""


class Batcher:
    """Micro-batching of concurrent requests into model calls of up to max_batch inputs (a request larger
    than that runs alone), each once its first input has waited window_s for company since it arrived. Up to
    `workers` model calls run at once, each in its own thread, sharing what waits; the next batch forms
    while they run."""

    def __init__(self, predict: Callable[[list], list], max_batch: int, window_s: float, max_queue: int,
                 workers: int = 1):
        self.predict, self.max_batch, self.window_s, self.max_queue = predict, max_batch, window_s, max_queue
        self.waiting: collections.deque = collections.deque()  # (inputs, future, arrival time) in arrival order
        self.waiting_inputs = 0
        self.pending = 0              # inputs waiting or running: what max_queue bounds
        self.batches = 0
        self.largest_batch = 0
        self.arrived = asyncio.Event()
        self.workers = workers
        self.free_workers = asyncio.Semaphore(workers)
        self.running: set[asyncio.Task] = set()
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="tunesmith-model")

    async def submit(self, inputs: list) -> list:
        """The predictions of `inputs`, in order (raises Busy when the queue cannot take them)."""
        if self.pending + len(inputs) > self.max_queue:
            raise Busy()
        self.pending += len(inputs)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((inputs, future, loop.time()))
        self.waiting_inputs += len(inputs)
        self.arrived.set()
        try:
            return await future
        finally:
            self.pending -= len(inputs)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.free_workers.acquire()  # a batch forms only when a worker can take it at once
            while not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
            deadline = self.waiting[0][2] + self.window_s  # from its arrival: one that waited for a worker goes at once
            while self.waiting_inputs < self.max_batch and (left := deadline - loop.time()) > 0:
                self.arrived.clear()
                try:
                    await asyncio.wait_for(self.arrived.wait(), left)
                except TimeoutError:
                    break
            # what is waiting is shared among the free workers: 32 clients and 2 workers are 2 calls of 16 at
            # once, not one call of 32 while the other worker idles until its answers bring new requests. Every
            # share starts now: a share left waiting for the next turn of this loop waited a whole window more
            # (4 requests, max_batch 4, 2 workers: 2 at once, then 1 + 1 a window later)
            free = self.workers - len(self.running)
            limit = min(self.max_batch, -(-self.waiting_inputs // free))
            for share in range(free):
                if share:
                    await self.free_workers.acquire()  # a worker that is free: taken at once
                group = [self.waiting.popleft()[:2]]
                taken = len(group[0][0])
                while self.waiting and taken + len(self.waiting[0][0]) <= limit:
                    taken += len(self.waiting[0][0])
                    group.append(self.waiting.popleft()[:2])
                self.waiting_inputs -= taken
                task = asyncio.create_task(self._run(group))
                self.running.add(task)  # held until done (the event loop keeps only weak references to tasks)
                task.add_done_callback(self._finished)
                if not self.waiting:
                    break

    def _finished(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        self.free_workers.release()

    async def _run(self, group: list) -> None:
        """One model call for the group; if it fails, each request alone (one bad input fails only its own)."""
        loop = asyncio.get_running_loop()
        live = [(inputs, fut) for inputs, fut in group if not fut.done()]  # a client that left is skipped
        if not live:
            return
        inputs = [x for batch, _ in live for x in batch]
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(inputs))
        try:
            results = await loop.run_in_executor(self.executor, self.predict, inputs)
        except Exception as exc:  # noqa: BLE001 - handed to the request(s) it belongs to
            if len(live) > 1:
                for one in live:
                    await self._run([one])
            elif not live[0][1].done():
                live[0][1].set_exception(exc)
            return
        start = 0
        for batch, fut in live:
            if not fut.done():
                fut.set_result(results[start:start + len(batch)])
            start += len(batch)


class PredictBody(BaseModel):
    """POST /predict as JSON: one input or a list (texts; for image models, base64-encoded image files)."""
    model_config = ConfigDict(extra="forbid")
    inputs: list[str]

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class RequestProblem(Exception):
    """A bad request: answered with `status` and the one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Model:
    """The loaded run and how raw inputs become prediction rows."""

    def __init__(self, run: str | Path, settings: ServeConfig):
        self.run = load_run(run, backend=settings.backend)
        self.task, self.cfg, self.labels = self.run.task, self.run.cfg, self.run.labels
        if not exportable(self.task):
            raise TunesmithError(f"task {self.task.NAME}: serving is not available for it yet")
        self.kind, self.settings = self.task.INPUT_KIND, settings
        device = getattr(self.run, "device", None) or torch.device("cpu")
        self.workers = model_workers(settings.workers, device)
        self.pad_to = pad_width_to(settings, device, self.cfg.train.pad_to_multiple_of)

    def predict(self, inputs: list) -> list[dict]:
        """Prediction rows (the task's prediction frame as JSON records) for raw texts or image paths."""
        examples = self.task.read_examples(inputs, self.cfg, self.labels, require_labels=False)
        outputs = self.run.logits(examples, self.settings.max_batch_size, quiet=True, pad_to=self.pad_to)
        frame = self.task.predictions_frame(examples, outputs, self.labels)
        rows = json.loads(frame.to_json(orient="records", force_ascii=False))
        del examples, outputs, frame
        if _MALLOC_TRIM is not None:  # what malloc keeps of the freed activations back to the system: without it
            _MALLOC_TRIM(0)           # a server's resident memory crept up with each call of a new shape
        return rows

    def metadata(self) -> dict:
        s = self.settings
        return {"task": self.task.NAME, "labels": list(getattr(self.labels, "names", [])),
                "problem_type": self.labels.problem_type, "model": self.cfg.model.name,
                "max_length": self.cfg.model.max_length if self.kind == "text" else None, "input": self.kind,
                "backend": s.backend,
                "limits": {"max_inputs_per_request": s.max_inputs_per_request,
                           "max_chars_per_input": s.max_chars_per_input, "max_image_bytes": s.max_image_bytes,
                           "max_queue": s.max_queue},
                "batching": {"max_batch_size": s.max_batch_size, "batch_window_ms": s.batch_window_ms,
                             "workers": self.workers, "pad_to_multiple_of": self.pad_to}}

    def body_limit(self) -> int:
        """Bytes a valid request can take: every input at its limit (JSON escapes take up to 6 bytes a
        character, base64 4 bytes per 3), plus room for the rest of the body."""
        s = self.settings
        per_input = s.max_chars_per_input * 6 if self.kind == "text" else s.max_image_bytes * 4 // 3 + 1024
        return s.max_inputs_per_request * per_input + 65536


def pad_width_to(settings: ServeConfig, device: torch.device, training_setting: int | str) -> int:
    """serve.pad_to_multiple_of resolved; auto: 8 for PyTorch on a CPU, else the run's train.pad_to_multiple_of.
    A CPU PyTorch server meets a new (batch, width) shape with nearly every call, and each new shape grew its
    memory (oneDNN kernels, malloc's free lists); widths rounded up to 8 tokens kept it flat over 1,000+
    calls (bench/README.md, Serving under load). ONNX Runtime stayed flat without it."""
    if settings.pad_to_multiple_of != "auto":
        return int(settings.pad_to_multiple_of)
    if settings.backend == "torch" and device.type == "cpu":
        return 8
    return pad_multiple(training_setting, device)


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc only (musl, macOS: none)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def model_workers(setting: int | str, device: torch.device | None) -> int:
    """serve.workers resolved: 'auto' fills the CPU cores with calls of torch.get_num_threads() threads each
    (OMP_NUM_THREADS=1 on 2 cores: 2 calls at once, as many as a thread pool calling the model per request
    would run), one on a GPU."""
    if setting != "auto":
        return int(setting)
    if device is not None and device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, torch.get_num_threads()))


def create_app(run: str | Path, settings: ServeConfig) -> FastAPI:
    """The FastAPI app serving `run` (its model is loaded here, once)."""
    model = Model(run, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(model.predict, settings.max_batch_size, settings.batch_window_ms / 1000, settings.max_queue,
                          model.workers)
        app.state.batcher = batcher
        worker = asyncio.create_task(batcher.run())
        yield  # uvicorn's graceful shutdown has finished the requests in flight when this returns
        worker.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="tunesmith", version="1", lifespan=lifespan,
                  description=f"{model.task.NAME} model of {run} ({settings.backend})")
    app.state.model = model

    @app.get("/health")
    async def health(request: Request) -> dict:
        b = request.app.state.batcher
        return {"status": "ok", "queued": b.pending, "batches": b.batches, "largest_batch": b.largest_batch}

    @app.get("/metadata")
    async def metadata() -> dict:
        return model.metadata()

    @app.post("/predict", openapi_extra=_predict_openapi())
    async def predict(request: Request):
        tmp = None
        try:
            inputs, names, tmp = await _read_inputs(request, model)
            rows = await request.app.state.batcher.submit(inputs)
        except RequestProblem as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        except Busy:
            b = request.app.state.batcher
            return JSONResponse({"detail": f"server busy: {b.pending} inputs queued (serve.max_queue "
                                           f"{settings.max_queue}); retry after {settings.retry_after_s} s"},
                                status_code=503, headers={"Retry-After": str(settings.retry_after_s)})
        except TunesmithError as exc:  # an input the task refuses
            return JSONResponse({"detail": str(exc) if tmp is None else str(exc).replace(str(tmp), "inputs")},
                                status_code=422)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if tmp is not None:  # image rows name the upload, not the temporary file
            for row, name, path in zip(rows, names, inputs):
                for key, value in row.items():
                    if value == path:
                        row[key] = name
        return {"predictions": rows}

    return app


async def _read_inputs(request: Request, model: Model) -> tuple[list, list[str], Path | None]:
    """(inputs for the model, their names, the temporary folder holding image files or None), checked
    against the limits; raises RequestProblem (413, 415, 422)."""
    s = model.settings
    body = await _read_body(request, model.body_limit())
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        if model.kind != "image":
            raise RequestProblem(415, "this model takes text: send JSON {\"inputs\": \"...\"} or a list of texts")
        files = _multipart_files(body, content_type)
        names = [name for name, _ in files]
        data = [blob for _, blob in files]
    elif content_type.split(";")[0].strip() in ("application/json", ""):
        try:
            parsed = PredictBody.model_validate(json.loads(body))
        except json.JSONDecodeError as exc:
            raise RequestProblem(422, f"body: malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        except UnicodeDecodeError:
            raise RequestProblem(422, "body: not UTF-8 text") from None
        except ValidationError as exc:
            raise RequestProblem(422, _field_problem(exc)) from None
        names = [f"inputs[{i}]" for i in range(len(parsed.inputs))]
        data = parsed.inputs
    else:
        raise RequestProblem(415, f"content type '{content_type}': send application/json"
                                  + (" or multipart/form-data (image uploads)" if model.kind == "image" else ""))
    if not data:
        raise RequestProblem(422, "inputs: empty list (give one input or more)")
    if len(data) > s.max_inputs_per_request:
        raise RequestProblem(413, f"inputs: {len(data)} in one request; this server takes at most "
                                  f"{s.max_inputs_per_request} (serve.max_inputs_per_request): split the request")
    if model.kind == "text":
        for name, text in zip(names, data):
            if len(text) > s.max_chars_per_input:
                raise RequestProblem(413, f"{name}: {len(text)} characters; this server takes at most "
                                          f"{s.max_chars_per_input} per input (serve.max_chars_per_input)")
            if not text.strip():
                raise RequestProblem(422, f"{name}: empty text")
        return list(data), names, None
    return _image_files(data, names, s.max_image_bytes, from_json=not content_type.startswith("multipart/"))


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes (before it is all read)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestProblem(413, f"body: {int(declared)} bytes; this server takes at most {limit} per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestProblem(413, f"body: more than {limit} bytes; this server takes at most {limit} per request")
        chunks.append(chunk)
    return b"".join(chunks)


def _field_problem(exc: ValidationError) -> str:
    """'inputs[2]: Input should be a valid string' for each problem (the first three)."""
    def where(loc: tuple) -> str:
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "body"
    errors = exc.errors()
    more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
    return "; ".join(f"{where(e['loc'])}: {e['msg']}" for e in errors[:3]) + more


def _multipart_files(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each uploaded file. Parsed with the standard library's MIME reader
    (python-multipart, FastAPI's usual parser, is not a dependency here); every part must be field 'files'."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise RequestProblem(422, "body: malformed multipart/form-data")
    files = []
    for i, part in enumerate(message.iter_parts()):
        field = part.get_param("name", header="content-disposition")
        if field != "files":
            raise RequestProblem(422, f"form field '{field}': unknown (upload images as field 'files')")
        files.append((part.get_filename() or f"files[{i}]", part.get_payload(decode=True) or b""))
    return files


def _image_files(data: list, names: list[str], max_bytes: int, from_json: bool) -> tuple[list, list[str], Path]:
    """Each image checked (size, decodable) and written to a temporary folder; returns their paths."""
    from PIL import Image, UnidentifiedImageError
    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-serve-"))
    paths = []
    try:
        for i, (name, item) in enumerate(zip(names, data)):
            blob = item
            if from_json:
                text = item.split(",", 1)[1] if item.startswith("data:") else item  # a data: URI works too
                if len(text) > max_bytes * 4 // 3 + 4:
                    raise RequestProblem(413, f"{name}: image larger than {max_bytes} bytes (serve.max_image_bytes)")
                try:
                    blob = base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError):
                    raise RequestProblem(422, f"{name}: not base64 (send each image file base64-encoded)") from None
            if len(blob) > max_bytes:
                raise RequestProblem(413, f"{name}: image of {len(blob)} bytes; this server takes at most "
                                          f"{max_bytes} (serve.max_image_bytes)")
            try:
                with Image.open(io.BytesIO(blob)) as image:
                    image.verify()
                    suffix = "." + (image.format or "png").lower()
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise RequestProblem(422, f"{name}: not a readable image ({exc})") from None
            path = tmp / f"{i}{suffix}"
            path.write_bytes(blob)
            paths.append(str(path))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return paths, names, tmp


def _predict_openapi() -> dict:
    """The request body of POST /predict in the OpenAPI docs (it is read by hand: JSON or multipart)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictBody.model_json_schema(),
                             "example": {"inputs": ["a gripping, beautifully shot film", "two hours I want back"]}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _saved_config(folder: Path) -> Path:
    """The config saved with the run's model (or with its ONNX export, or in an export folder)."""
    for place in (folder / "model", folder, folder / "onnx"):
        if (place / RUN_INFO).is_file() and (place / "tunesmith_config.yaml").is_file():
            return place / "tunesmith_config.yaml"
    raise TunesmithError(f"{folder}: not a tunesmith run folder (no model/{RUN_INFO})")


def serve(run: str | Path, overrides: dict | None = None) -> int:
    """Load the run's model once and serve it until SIGTERM / Ctrl-C (requests in flight are finished)."""
    import uvicorn

    settings = load_config(_saved_config(Path(run)), overrides, saved=True).serve
    # oneDNN (PyTorch's bf16 matmuls on CPUs) keeps the kernels of its last 1,024 shapes; a server meets a new
    # (batch, length) shape with nearly every call, and that cache alone grew MiniLM-L6's server by ~1.5 GB
    # before it levelled off (bench/README.md). 16 cost no measurable speed there. Read when the first kernel
    # is made, so set before the model runs; a value the user set wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections accepted from a socket
    # that says so, and without it every answer waited ~40 ms for the client's delayed ACK (Nagle's algorithm)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM,
                         socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise TunesmithError(f"serve: cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc})") from None
    try:
        app = create_app(run, settings)  # the model loads here, once, before the first request is accepted
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    if not is_loopback(settings.host):
        print(f"tunesmith: warning: listening on {settings.host}, reachable from other machines; there is no "
              "authentication", file=sys.stderr)
    print(f"tunesmith: serving {run} ({app.state.model.task.NAME}, {settings.backend}) on http://{host}:{port} "
          f"(POST /predict, GET /health, GET /metadata, docs at /docs); Ctrl-C stops", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           timeout_graceful_shutdown=settings.graceful_timeout_s))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the stopping signal again once it has shut down gracefully
        pass
    print("tunesmith: server stopped", file=sys.stderr)
    return 0
