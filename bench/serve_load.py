"""Load test of `tunesmith serve` against a plain FastAPI endpoint that calls the transformers pipeline per request.

    .venv/bin/python bench/serve_load.py RUN [--clients 1 8 32 128] [--requests 400] [--duration 60]
                                             [--sides baseline torch onnx] [--soak 600]

Each side is started in its own process on a free loopback port (tunesmith: `tunesmith serve RUN
[--backend onnx]` with its defaults; baseline: the app in `baseline_app` below, uvicorn, one worker), one
after the other. For each number of concurrent clients an async load generator in this process
(hand-written HTTP/1.1 on asyncio streams, one keep-alive connection per client) sends up to --requests
requests (at least 4 per client) for at most --duration seconds: each request is
one review of the run's test split, cycled, as JSON {"inputs": text}. It prints requests/s, p50/p95/p99
latency of the answered requests, errors (any non-200 answer or failed connection) and the server's peak
RSS (VmHWM from /proc, cumulative over the levels). --soak S then runs 32 clients against `tunesmith serve`
for S seconds and samples its RSS every 10 s. The load generator shares the machine with the server (both
sides alike). `--onnx` needs RUN/onnx (`tunesmith export RUN`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

HERE = Path(__file__).resolve()


class Body(BaseModel):  # at module level: FastAPI resolves the annotation by name
    inputs: str


def baseline_app(run: str):
    """The anchor: FastAPI + the transformers text-classification pipeline, called once per request."""
    from fastapi import FastAPI
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(Path(run) / "model"), device=-1)
    app = FastAPI()

    @app.post("/predict")
    def predict(body: Body) -> dict:
        return {"predictions": classify(body.inputs, truncation=True, max_length=128)}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(side: str, run: str, port: int) -> subprocess.Popen:
    if side == "baseline":
        cmd = [sys.executable, str(HERE), run, "--baseline-server", "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "tunesmith.cli", "serve", run, "--port", str(port), "--backend", side]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{side} server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"{side} server did not start")


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, path: str,
                    payload: bytes) -> int:
    """One HTTP/1.1 keep-alive POST on an open connection; returns the status (the body is read and dropped).
    Hand-written on asyncio streams: an httpx client with 32-128 connections in one process took more CPU than
    the server it measured (a do-nothing FastAPI endpoint topped out at ~300 requests/s with 32 httpx clients
    and ~170 with 128 on this 2-core machine)."""
    writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(payload)).encode() +
                 b"\r\n\r\n" + payload)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    await reader.readexactly(length)
    return status


async def load(url: str, texts: list[str], clients: int, requests: int, duration: float) -> dict:
    """`clients` connections, each sending its next request as soon as the last one is answered."""
    from urllib.parse import urlsplit
    where = urlsplit(url)
    payloads = [json.dumps({"inputs": t}).encode() for t in texts]
    latencies: list[float] = []
    errors = 0
    counter = itertools.count()
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(where.hostname, where.port)
        try:
            while (i := next(counter)) < requests and time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    ok = await post_json(reader, writer, where.netloc, where.path, payloads[i % len(payloads)]) == 200
                except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
                    ok = False
                    writer.close()
                    reader, writer = await asyncio.open_connection(where.hostname, where.port)
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    pct = np.percentile(ms, [50, 95, 99]) if len(ms) else [float("nan")] * 3
    return {"requests": len(latencies) + errors, "rps": len(latencies) / wall, "p50": pct[0], "p95": pct[1],
            "p99": pct[2], "errors": errors, "seconds": wall}


def test_texts(run: str) -> list[str]:
    from tunesmith.inference import LoadedRun  # noqa: F401 - the package's import-time settings
    from tunesmith.config import load_config
    from tunesmith.tasks import TASKS
    from tunesmith.tasks.base import resolve_data_config
    cfg = load_config(Path(run) / "model" / "tunesmith_config.yaml", saved=True)
    task = TASKS[cfg.task]
    return list(task.read_examples(resolve_data_config(cfg.data).test, cfg, None, require_labels=False).texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=400, help="per level (at least 4 per client)")
    parser.add_argument("--duration", type=float, default=60, help="seconds per level at most")
    parser.add_argument("--sides", nargs="+", default=["baseline", "torch", "onnx"])
    parser.add_argument("--soak", type=float, default=0, help="seconds of 32 clients against tunesmith serve")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        import uvicorn
        uvicorn.run(baseline_app(args.run), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
        return
    texts = test_texts(args.run)
    rows = []
    for side in args.sides:
        port = free_port()
        proc = start(side, args.run, port)
        url = f"http://127.0.0.1:{port}/predict"
        asyncio.run(load(url, texts, 4, 20, 60))  # warm-up
        for clients in args.clients:
            result = asyncio.run(load(url, texts, clients, max(args.requests, 4 * clients), args.duration))
            result.update(side=side, clients=clients, peak_rss=rss_mb(proc.pid, "VmHWM"))
            rows.append(result)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
        if side == "torch" and args.soak:
            soak(url, texts, proc.pid, args.soak)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"\n{len(texts)} distinct review texts, one per request; {os.cpu_count()} CPUs\n")
    print("| side | clients | requests | requests/s | p50 ms | p95 ms | p99 ms | errors | server peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['clients']} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p95']:.0f} | "
              f"{r['p99']:.0f} | {r['errors']} | {r['peak_rss']:.0f} |")
    by = {(r["side"], r["clients"]): r["rps"] for r in rows}
    for side in ("torch", "onnx"):
        for clients in args.clients:
            if by.get(("baseline", clients)) and (side, clients) in by:
                print(f"tunesmith {side} / baseline at {clients} clients: {by[(side, clients)] / by[('baseline', clients)]:.2f}x")


def soak(url: str, texts: list[str], pid: int, seconds: float) -> None:
    """32 clients for `seconds`, in 10 s rounds; RSS after each round."""
    samples, done, errors = [], 0, 0
    end = time.time() + seconds
    while time.time() < end:
        result = asyncio.run(load(url, texts, 32, 10**9, min(10, end - time.time())))
        done, errors = done + result["requests"], errors + result["errors"]
        samples.append(rss_mb(pid, "VmRSS"))
    print(f"soak: {seconds:.0f} s, {done} requests, {errors} errors; RSS MB first {samples[0]:.0f}, "
          f"last {samples[-1]:.0f}, min {min(samples):.0f}, max {max(samples):.0f}; every 10 s: "
          + " ".join(f"{s:.0f}" for s in samples), flush=True)


if __name__ == "__main__":
    main()
