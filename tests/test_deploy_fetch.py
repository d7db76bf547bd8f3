"""scripts/fetch_models.py against a local HTTP server on 127.0.0.1 serving the tiny models."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.catalog import Catalog, HashCache
from engine.errors import ModelLoadError
from engine.fetch import DOWNLOADS, Fetcher, ManifestFile, read_manifest
from scripts import fetch_models

from .helpers import SD1, SDXL
from .test_http import running_server


class ModelServer:
    """Serves files with HTTP Range support. Modes per URL prefix: /good/, /corrupt/ (one byte
    flipped), /cut/ (sends half the bytes of each request, then closes the connection)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                mode, _, name = self.path.strip("/").partition("/")
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                if mode == "corrupt":
                    data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes="):
                    start = int(ranged[6:].split("-")[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Connection", "close")
                self.end_headers()
                if mode == "cut":
                    body = body[: max(1, len(body) // 2)]
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def model_bytes(tiny_models_dir: Path) -> dict[str, bytes]:
    return {name: (tiny_models_dir / "checkpoints" / name).read_bytes() for name in (SD1, SDXL)}


@pytest.fixture
def server(model_bytes: dict[str, bytes]) -> Iterator[ModelServer]:
    served = ModelServer(model_bytes)
    yield served
    served.close()


def entry(server: ModelServer, name: str, data: bytes, mode: str = "good") -> ManifestFile:
    return ManifestFile(
        f"checkpoints/{name}",
        f"{server.base}/{mode}/{name}",
        hashlib.sha256(data).hexdigest(),
        len(data),
    )


def fetcher(models: Path, retries: int = 2) -> Fetcher:
    return Fetcher(models, retries=retries, timeout_s=30, backoff_s=0)


def test_good_files_arrive_in_parallel_verified_and_hashed_once(
    server: ModelServer, model_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    files = [entry(server, name, data) for name, data in model_bytes.items()]
    assert fetcher(tmp_path).fetch_all(files, jobs=2) == []
    for name, data in model_bytes.items():
        assert (tmp_path / "checkpoints" / name).read_bytes() == data
    assert not list((tmp_path / DOWNLOADS).glob("*.part"))
    # The catalog of a fresh process finds every hash in the cache: nothing is hashed.
    cache = HashCache(tmp_path / ".cache" / "hashes.json", root=tmp_path)
    catalog = Catalog.scan(tmp_path, hash_cache=cache)
    assert cache.bytes_hashed == 0
    by_name = {c.name: c.sha256 for c in catalog.checkpoints}
    assert by_name == {f.path.split("/", 1)[1]: f.sha256 for f in files}
    # A second run downloads nothing.
    before = len(server.requests)
    assert fetcher(tmp_path).fetch_all(files) == []
    assert len(server.requests) == before


def test_corrupt_download_is_refused_and_leaves_nothing(
    server: ModelServer, model_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    problems = fetcher(tmp_path).fetch_all([entry(server, SD1, model_bytes[SD1], "corrupt")])
    assert len(problems) == 1 and "sha256 mismatch" in problems[0] and SD1 in problems[0]
    assert not (tmp_path / "checkpoints" / SD1).exists()
    assert not list((tmp_path / DOWNLOADS).glob("*.part"))


def test_truncated_download_is_retried_with_range_and_resumed(
    server: ModelServer, model_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    data = model_bytes[SD1]
    cut = entry(server, SD1, data, "cut")
    # Every response is cut short: after its retries nothing is in the models folder, and the
    # partial file holds what arrived.
    problems = fetcher(tmp_path, retries=3).fetch_all([cut])
    assert len(problems) == 1 and "download failed after 3 tries" in problems[0]
    assert not (tmp_path / "checkpoints" / SD1).exists()
    (part,) = (tmp_path / DOWNLOADS).glob("*.part")
    have = part.stat().st_size
    assert 0 < have < len(data) and data.startswith(part.read_bytes())
    ranges = [r for path, r in server.requests if path.startswith("/cut/")]
    assert ranges[0] is not None and ranges[1] != ranges[0]  # each try resumed further on
    # The next run (the server now healthy) asks only for the rest.
    good = entry(server, SD1, data)
    assert fetcher(tmp_path).fetch_all([good]) == []
    assert server.requests[-1][1] == f"bytes={have}-"
    assert (tmp_path / "checkpoints" / SD1).read_bytes() == data


def test_manifest_is_checked_before_anything_downloads(tmp_path: Path) -> None:
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        '[[file]]\npath = "../etc/x.safetensors"\nurl = "http://127.0.0.1/x"\n'
        'sha256 = "' + "0" * 64 + '"\nsize = 1\n'
    )
    with pytest.raises(ModelLoadError, match=r"file #1: path '../etc/x.safetensors' must be"):
        read_manifest(manifest)


def test_manifest_takes_upscaler_files(tmp_path: Path) -> None:
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        '[[file]]\npath = "upscalers/RealESRGAN_x4plus.pth"\nurl = "https://example.org/x"\n'
        'sha256 = "' + "0" * 64 + '"\nsize = 1\n'
    )
    assert [f.path for f in read_manifest(manifest)] == ["upscalers/RealESRGAN_x4plus.pth"]


def test_the_script_end_to_end(
    server: ModelServer, model_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    data = model_bytes[SD1]
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        f'[[file]]\npath = "checkpoints/{SD1}"\nurl = "{server.base}/good/{SD1}"\n'
        f'sha256 = "{hashlib.sha256(data).hexdigest()}"\nsize = {len(data)}\n'
    )
    models = tmp_path / "models"
    assert fetch_models.main(["--manifest", str(manifest), "--models-dir", str(models)]) == 0
    assert (models / "checkpoints" / SD1).read_bytes() == data


def test_shipped_manifest_parses() -> None:
    read_manifest(Path(__file__).resolve().parent.parent / "models.toml")


@pytest.mark.http
def test_sd_fetch_models_at_setup_through_the_cog_server(
    server: ModelServer, model_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    """SD_FETCH_MODELS=1: setup fetches the manifest's files, then serves them; a corrupt file
    fails setup naming it and lands nowhere. (A server per case: setup runs in its own
    process, as in a container.)"""
    data = model_bytes[SD1]
    manifest = tmp_path / "models.toml"
    manifest.write_text(
        f'[[file]]\npath = "checkpoints/{SD1}"\nurl = "{server.base}/good/{SD1}"\n'
        f'sha256 = "{hashlib.sha256(data).hexdigest()}"\nsize = {len(data)}\n'
    )
    env = {"SD_FETCH_MODELS": "1", "SD_MODELS_MANIFEST": str(manifest)}
    with running_server(tmp_path / "models", tmp_path / "ok.log", env) as (cog, status):
        assert status == "READY", (tmp_path / "ok.log").read_text()[-3000:]
        _, reply = cog.call("POST", "/predictions", {"input": {"endpoint": "sd-models"}})
        assert [
            m["filename"].rsplit("/", 1)[-1] for m in json.loads(reply["output"]["listing"])
        ] == [SD1]
    manifest.write_text(manifest.read_text().replace("/good/", "/corrupt/"))
    other = tmp_path / "other"
    with running_server(other, tmp_path / "bad.log", env) as (cog, status):
        assert status == "SETUP_FAILED"
        _, health = cog.call("GET", "/health-check")
        assert f"SD_FETCH_MODELS: checkpoints/{SD1}: sha256 mismatch" in health["setup"]["logs"]
    assert not (other / "checkpoints").exists()
