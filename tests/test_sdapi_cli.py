"""`python -m sdapi` as a user starts it (a subprocess over its own models folder), and the
refresh-* routes: new files load, removed ones unload, a request in flight is unaffected."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdapi.__main__ import DEFAULT_PORT, arguments

from .cog_server import free_port, stop
from .helpers import payload
from .sdapi_server import Client, wait_until

REPO = Path(__file__).resolve().parent.parent
SD15 = "tiny-sd15.safetensors"


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def models(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small models folder of its own (one checkpoint), which the tests change."""
    folder = tmp_path_factory.mktemp("sdapi-models")
    (folder / "checkpoints").mkdir()
    shutil.copy(tiny_models_dir / "checkpoints" / SD15, folder / "checkpoints" / SD15)
    for kind in ("loras", "vae", "embeddings"):
        shutil.copytree(tiny_models_dir / kind, folder / kind)
    return folder


@pytest.fixture(scope="module")
def client(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    port = free_port()
    log = tmp_path_factory.mktemp("sdapi") / "server.log"
    env = {**os.environ, "SD_MODELS_DIR": str(models), "HF_HUB_OFFLINE": "1", "PORT": str(port)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sdapi", "--api-auth", "user:secret"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = Client(f"http://127.0.0.1:{port}", "user", "secret")

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"python -m sdapi exited:\n{log.read_text()[-4000:]}")
        try:
            return client.get("/sdapi/v1/sd-models")[0] == 200
        except OSError:
            return False

    try:
        wait_until(ready, "python -m sdapi to serve", tries=1200, pause=0.25)
        yield client
    finally:
        stop(process)


def titles(client: Client, route: str, key: str) -> list[str]:
    status, listing = client.get(f"/sdapi/v1/{route}")
    assert status == 200, listing
    return [item[key] for item in listing]


def generate(client: Client, **changes: Any) -> tuple[int, Any]:
    return client.post("/sdapi/v1/txt2img", json.loads(payload(**changes)))


def test_arguments_default_to_loopback_and_the_port_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PORT", raising=False)
    args = arguments([])
    assert (args.host, args.port, args.api_auth) == ("127.0.0.1", DEFAULT_PORT, "")
    monkeypatch.setenv("PORT", "9123")
    assert arguments([]).port == 9123
    assert arguments(["--port", "9000"]).port == 9000


def test_the_server_needs_its_credentials(client: Client) -> None:
    assert Client(client.base).get("/sdapi/v1/sd-models")[0] == 401


def test_refresh_checkpoints_loads_new_files_and_drops_removed_ones(
    client: Client, models: Path
) -> None:
    extra = models / "checkpoints" / "extra.safetensors"
    named = {"override_settings": {"sd_model_checkpoint": "extra"}}
    status, reply = generate(client, **named)
    assert status == 422 and "extra" in reply["detail"]
    shutil.copy(models / "checkpoints" / SD15, extra)
    assert client.post("/sdapi/v1/refresh-checkpoints") == (200, None)
    assert any(t.startswith("extra.safetensors") for t in titles(client, "sd-models", "title"))
    status, with_extra = generate(client, **named)
    assert status == 200, with_extra
    # The same weights under another name: the same picture.
    _, with_sd15 = generate(client)
    assert np.array_equal(pixels(with_extra["images"][0]), pixels(with_sd15["images"][0]))
    assert json.loads(with_extra["info"])["sd_model_name"] == "extra"
    extra.unlink()
    assert client.post("/sdapi/v1/refresh-checkpoints") == (200, None)
    assert not any(t.startswith("extra") for t in titles(client, "sd-models", "title"))
    assert generate(client, **named)[0] == 422


def test_a_request_in_flight_keeps_its_models_through_a_refresh(
    client: Client, models: Path
) -> None:
    extra = models / "checkpoints" / "extra2.safetensors"
    shutil.copy(models / "checkpoints" / SD15, extra)
    assert client.post("/sdapi/v1/refresh-checkpoints")[0] == 200
    long = {"steps": 25, "override_settings": {"sd_model_checkpoint": "extra2"}}
    _, alone = generate(client, **long)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(reply=generate(client, **long)))
    thread.start()
    wait_until(
        lambda: client.get("/sdapi/v1/progress")[1]["state"]["sampling_step"] >= 1, "the run"
    )
    extra.unlink()
    assert client.post("/sdapi/v1/refresh-checkpoints") == (200, None)  # waits its turn
    thread.join(timeout=300)
    status, reply = out["reply"]
    assert status == 200
    assert np.array_equal(pixels(reply["images"][0]), pixels(alone["images"][0]))
    assert not any(t.startswith("extra2") for t in titles(client, "sd-models", "title"))


def test_refresh_loras_and_vae(client: Client, models: Path) -> None:
    shutil.copy(
        models / "loras" / "tiny-lora-sd15.safetensors", models / "loras" / "copy.safetensors"
    )
    shutil.copy(models / "vae" / "tiny-vae.safetensors", models / "vae" / "copy-vae.safetensors")
    assert "copy" not in titles(client, "loras", "name")
    status, reply = generate(client, prompt="a cat <lora:copy:1>")
    assert status == 422 and "copy" in reply["detail"]
    assert client.post("/sdapi/v1/refresh-loras") == (200, None)
    assert "copy" in titles(client, "loras", "name")
    status, by_copy = generate(client, prompt="a cat <lora:copy:1>")
    assert status == 200, by_copy
    _, by_original = generate(client, prompt="a cat <lora:tiny-lora-sd15:1>")
    assert np.array_equal(pixels(by_copy["images"][0]), pixels(by_original["images"][0]))
    assert client.post("/sdapi/v1/refresh-vae") == (200, None)
    assert "copy-vae.safetensors" in titles(client, "sd-vae", "model_name")
    assert client.post("/sdapi/v1/refresh-embeddings") == (200, None)


def test_a_file_that_fails_to_load_fails_the_refresh_and_the_old_models_serve(
    client: Client, models: Path
) -> None:
    broken = models / "checkpoints" / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    try:
        status, reply = client.post("/sdapi/v1/refresh-checkpoints")
        assert status == 500 and "broken.safetensors" in reply["detail"], reply
        assert not any(t.startswith("broken") for t in titles(client, "sd-models", "title"))
        assert generate(client)[0] == 200
    finally:
        broken.unlink()
