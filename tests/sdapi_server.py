"""The local webui server (sdapi/) for tests: uvicorn in a thread of the test process on a
free 127.0.0.1 port (real HTTP over loopback), sharing the session's loaded engine."""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from engine.api import Engine
from sdapi.app import ServerConfig, create_app

from .cog_server import free_port

REQUEST_TIMEOUT_S = 120
START_TIMEOUT_S = 30


class Client:
    """Plain urllib calls (the webuiapi client is used where a test is about it)."""

    def __init__(self, base: str, user: str | None = None, password: str = "") -> None:
        self.base = base
        self.headers: dict[str, str] = {}
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        for key, value in self.headers.items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
                text = reply.read().decode()
                return reply.status, json.loads(text) if text else None, dict(reply.headers)
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            return err.code, json.loads(text) if text else None, dict(err.headers)

    def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        status, reply, _ = self.call("POST", path, body)
        return status, reply

    def get(self, path: str) -> tuple[int, Any]:
        status, reply, _ = self.call("GET", path)
        return status, reply


@contextmanager
def serving(engine: Engine, config: ServerConfig | None = None) -> Iterator[str]:
    """Serve `engine` on 127.0.0.1; yield the base URL; stop the server afterwards."""
    port = free_port()
    app = create_app(engine, config)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="sdapi-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the sdapi server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(check: Any, what: str, tries: int = 1200, pause: float = 0.02) -> Any:
    """Poll `check()` until it returns something truthy (a bounded number of tries)."""
    for _ in range(tries):
        value = check()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"gave up waiting for {what}")
