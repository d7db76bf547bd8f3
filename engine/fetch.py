"""Model files from a manifest (models.toml): downloaded in parallel, resumed, verified.

Used before `cog build` to bake weights into an image (scripts/fetch_models.py), or at setup
with SD_FETCH_MODELS=1 for images that keep weights out. A download goes to
`<models>/.cache/downloads/<sha256>.part` (outside every model folder, kept out of images by
.dockerignore) and is moved into place only after its size and sha256 match the manifest, so a
corrupt or truncated download never lands where the catalog looks. An interrupted download is
resumed with an HTTP Range request. The sha256 (and webui's old hash) computed while verifying
go into the hash cache, so setup hashes nothing.
"""

from __future__ import annotations

import http.client
import logging
import os
import time
import tomllib
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .catalog import CHECKPOINT_DIR, FILE_KINDS, HashCache, hash_file
from .errors import ModelLoadError

log = logging.getLogger(__name__)

FOLDERS = frozenset({CHECKPOINT_DIR, *FILE_KINDS.values()})
CHUNK = 1 << 20
DOWNLOADS = Path(".cache") / "downloads"


@dataclass(frozen=True)
class ManifestFile:
    """One `[[file]]` of models.toml."""

    path: str  # relative to the models folder, e.g. "checkpoints/sdxl.safetensors"
    url: str
    sha256: str
    size: int


def read_manifest(manifest: Path) -> list[ManifestFile]:
    """The `[[file]]` entries, each checked (path inside a model folder, 64-hex sha256, ...)."""
    data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    files = []
    for index, entry in enumerate(data.get("file", [])):
        where = f"{manifest.name}: file #{index + 1}"
        missing = [k for k in ("path", "url", "sha256", "size") if k not in entry]
        if missing:
            raise ModelLoadError(f"{where} lacks {', '.join(missing)}")
        rel = PurePosixPath(entry["path"])
        if (
            rel.is_absolute()
            or ".." in rel.parts
            or len(rel.parts) < 2
            or rel.parts[0] not in FOLDERS
        ):
            raise ModelLoadError(
                f"{where}: path {entry['path']!r} must be a relative path inside one of "
                f"{', '.join(sorted(FOLDERS))}"
            )
        sha = str(entry["sha256"]).lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ModelLoadError(f"{where}: sha256 {entry['sha256']!r} is not 64 hex digits")
        if not str(entry["url"]).startswith(("https://", "http://")):
            raise ModelLoadError(f"{where}: url {entry['url']!r} must be http(s)")
        if not isinstance(entry["size"], int) or entry["size"] < 0:
            raise ModelLoadError(f"{where}: size {entry['size']!r} must be a byte count")
        files.append(ManifestFile(str(rel), str(entry["url"]), sha, int(entry["size"])))
    return files


Progress = Callable[[str, int], None]  # (file path, bytes just received)


@dataclass(frozen=True)
class Fetcher:
    """Downloads manifest files into `models_dir`."""

    models_dir: Path
    retries: int = 3
    timeout_s: float = 60.0
    backoff_s: float = 1.0

    def cache(self) -> HashCache:
        return HashCache(self.models_dir / ".cache" / "hashes.json", root=self.models_dir)

    def fetch_all(
        self, files: list[ManifestFile], jobs: int = 4, progress: Progress | None = None
    ) -> list[str]:
        """Fetch every file (in parallel); return the problems, one line each (empty = done)."""
        cache = self.cache()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(lambda f: self._fetch_one(f, cache, progress), files))
        return [r for r in results if r]

    def _fetch_one(self, file: ManifestFile, cache: HashCache, progress: Progress | None) -> str:
        target = self.models_dir / file.path
        # 1. Already there and right (the hash cache answers without reading a known file).
        if target.is_file() and target.stat().st_size == file.size:
            if cache.sha256(target) == file.sha256:
                return ""
            return f"{file.path}: exists with another sha256; remove it to download it again"
        # 2. Download into the partial file, resuming, with retries.
        part = self.models_dir / DOWNLOADS / f"{file.sha256}.part"
        part.parent.mkdir(parents=True, exist_ok=True)
        error = ""
        for attempt in range(1, self.retries + 1):
            try:
                self._download(file, part, progress)
                error = ""
                break
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = f"{file.path}: download failed after {attempt} tries ({exc})"
                log.warning("%s: try %d of %d failed: %s", file.path, attempt, self.retries, exc)
                time.sleep(self.backoff_s * attempt)
        if error:
            return error  # the partial file stays for the next run to resume
        # 3. Verify; only a matching file moves into the model folder.
        hashes = hash_file(part)
        if hashes.sha256 != file.sha256:
            part.unlink()
            return f"{file.path}: sha256 mismatch (got {hashes.sha256}, manifest {file.sha256})"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, target)
        cache.put(target, hashes)
        log.info("%s: verified and in place", file.path)
        return ""

    def _download(self, file: ManifestFile, part: Path, progress: Progress | None) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > file.size:
            part.unlink()
            have = 0
        if have == file.size:
            return
        request = urllib.request.Request(file.url, headers={"Range": f"bytes={have}-"})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
            if reply.status != 206:  # the server ignored Range: start over
                have = 0
            with part.open("ab" if have else "wb") as out:
                while block := reply.read(CHUNK):
                    out.write(block)
                    if progress:
                        progress(file.path, len(block))
        size = part.stat().st_size
        if size != file.size:
            raise ValueError(f"got {size} of {file.size} bytes")


def fetch_from_env(models_dir: Path, manifest: Path) -> None:
    """SD_FETCH_MODELS=1 at setup: fetch the manifest's files or fail setup naming them."""
    problems = Fetcher(models_dir).fetch_all(read_manifest(manifest))
    if problems:
        raise ModelLoadError("SD_FETCH_MODELS: " + "; ".join(problems))
