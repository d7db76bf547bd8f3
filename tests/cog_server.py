"""Running the real Cog HTTP server (coglet) on 127.0.0.1 for tests, and talking to it."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .cog_schema import install_schema

REPO = Path(__file__).resolve().parent.parent
SETUP_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 120
BUSY_RETRIES = 50


class CogServer:
    def __init__(self, base: str, process: subprocess.Popen[bytes], log: Path):
        self.base = base
        self.process = process
        self.log = log

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
                text = reply.read().decode()
                return reply.status, json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            return err.code, json.loads(text) if text else None

    def health(self) -> str:
        _, body = self.call("GET", "/health-check")
        return str(body["status"])

    def settled_health(self, timeout: float = 10.0) -> str:
        """Health once the last prediction's slot is released (coglet reports BUSY for a
        moment after answering)."""
        deadline = time.monotonic() + timeout
        status = self.health()
        while status == "BUSY" and time.monotonic() < deadline:
            time.sleep(0.1)
            status = self.health()
        return status

    def predict(self, api_json: str, endpoint: str = "auto", **inputs: Any) -> dict[str, Any]:
        body = {"input": {"api_json": api_json, "endpoint": endpoint, **inputs}}
        # coglet frees the slot a moment after it answers a sync prediction; a request sent in
        # that moment gets 409 "At capacity" (no queue): retry briefly, a bounded number of times.
        for _ in range(BUSY_RETRIES):
            status, reply = self.call("POST", "/predictions", body)
            if status != 409:
                break
            time.sleep(0.1)
        assert status == 200, reply
        return dict(reply)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_server(
    models_dir: Path, log: Path, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[CogServer, str]]:
    """Start the Cog server over `models_dir`; yield it with its status once setup ended.

    The server validates inputs against the schema `cog build` would bake in (written to
    .cog/openapi_schema.json first), as on Replicate."""
    install_schema(REPO)
    port = free_port()
    env = dict(os.environ)
    env.update(
        PORT=str(port),
        COG_PREDICT_TYPE_STUB="predict.py:Predictor",
        SD_MODELS_DIR=str(models_dir),
        HF_HUB_OFFLINE="1",
        # The worker is started as plain `python`: our interpreter must come first on PATH.
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    # The tests compare the server's pixels with this process's engine: the same OpenMP thread
    # count (predict.py defaults the server to 1; other counts round some floats differently).
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    env.update(extra_env or {})
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = CogServer(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        status = "STARTING"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            try:
                status = server.health()
            except OSError:
                status = "UNREACHABLE"
            if status in ("READY", "SETUP_FAILED", "DEFUNCT"):
                break
            time.sleep(0.5)
        yield server, status
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate a server process; kill it if it has not exited after 20 s."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def image_bytes(prediction: dict[str, Any]) -> list[bytes]:
    urls = prediction["output"]["images"]
    return [base64.b64decode(url.split(",", 1)[1]) for url in urls]
