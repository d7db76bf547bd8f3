"""What model files are on disk, under the names and hashes webui gives them.

`Catalog.scan(models_dir)` walks the model folders once (at setup) and returns an
immutable snapshot. Request values are only ever looked up in the snapshot's alias
table: a name from a request is never joined to a path, so nothing outside the model
folders can be opened because a request named it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, UnknownName, show_choices

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_SUFFIXES = frozenset({".safetensors", ".ckpt", ".pt"})
DIFFUSERS_MARKER = "model_index.json"

# Folders of the other model kinds and the file suffixes each lists (webui reads
# LoRAs, embeddings, VAEs and ControlNets from these suffixes too).
FILE_KINDS: Mapping[str, str] = {
    "loras": "loras",
    "embeddings": "embeddings",
    "vae": "vae",
    "controlnet": "controlnet",
    "upscalers": "upscalers",
}
FILE_SUFFIXES = frozenset({".safetensors", ".pt", ".ckpt", ".bin"})
# Upscaler files are .pth (webui's ESRGAN/RealESRGAN folders) or .pt/.safetensors; a .ckpt or
# .bin there is not an upscaler file. engine/upscaler_models.py reads them.
KIND_SUFFIXES: Mapping[str, frozenset[str]] = {
    "upscalers": frozenset({".pth", ".pt", ".safetensors"}),
}

HASH_BLOCK = 1 << 20  # stream in 1 MiB blocks
# webui's legacy "model hash" (sd_models.model_hash): sha256 of the 64 KiB at 1 MiB.
OLDHASH_START = 0x100000
OLDHASH_END = OLDHASH_START + 0x10000


# --------------------------------------------------------------------------- hashes

PROBE_BYTES = 64 * 1024


@dataclass(frozen=True)
class FileHashes:
    """Both webui checkpoint hashes of one file."""

    sha256: str  # full file, 64 hex
    oldhash: str  # legacy 8 hex


def hash_file(path: Path) -> FileHashes:
    """Read `path` once, in 1 MiB blocks, and return its sha256 and webui oldhash.

    The oldhash window [1 MiB, 1 MiB + 64 KiB) is taken from the same stream, so the
    legacy hash costs no second read. A file shorter than 1 MiB hashes what lies in
    the window, maybe nothing (webui does the same: it seeks and reads what is there).
    """
    full = hashlib.sha256()
    old = hashlib.sha256()
    pos = 0
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            full.update(block)
            start, end = max(pos, OLDHASH_START), min(pos + len(block), OLDHASH_END)
            if start < end:
                old.update(block[start - pos : end - pos])
            pos += len(block)
    return FileHashes(sha256=full.hexdigest(), oldhash=old.hexdigest()[:8])


def fingerprint(path: Path) -> tuple[int, str]:
    """(size, sha256 of the first and last 64 KiB): what a cache entry must still match."""
    probe = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        probe.update(fh.read(PROBE_BYTES))
        if size > PROBE_BYTES:
            fh.seek(max(PROBE_BYTES, size - PROBE_BYTES))
            probe.update(fh.read(PROBE_BYTES))
    return size, probe.hexdigest()


class HashCache:
    """Persisted `{key: {"size", "probe", "sha256", "oldhash"}}` so a start hashes nothing known.

    The key is the file's path relative to `root` (the models folder), so a cache written on
    one machine (scripts/fetch_models.py writes it while verifying downloads) is valid in every
    container the folder is copied into; files outside `root` are keyed by absolute path. An
    entry counts while the file's size and `probe` (sha256 of its first and last 64 KiB, which
    differ between two fine-tunes of one architecture even at equal size) are unchanged: mtime
    is not used, since copying into an image may change it. With `path=None`, or when the cache
    file cannot be written (a read-only image), entries live in memory (a warning is logged
    once) and scanning goes on; a readable cache file is still used.
    """

    def __init__(self, path: Path | None, root: Path | None = None) -> None:
        self.path = path
        self.root = Path(os.path.abspath(root)) if root is not None else None
        self._entries: dict[str, dict[str, Any]] = self._load(path) if path else {}
        self._writable = path is not None
        self.bytes_hashed = 0  # full-file hashing done by this object (setup benchmarks)

    def key(self, file: Path) -> str:
        """`file` relative to the root ("/" separators), or its absolute path outside it."""
        path = os.path.abspath(file)
        if self.root is not None:
            rel = os.path.relpath(path, self.root)
            if not rel.startswith(".." + os.sep) and rel != ".." and not os.path.isabs(rel):
                return Path(rel).as_posix()
        return path

    def sha256(self, file: Path) -> str:
        """Full-file sha256 of `file` (hex), from the cache when still fresh."""
        return self.hashes(file).sha256

    def oldhash(self, file: Path) -> str:
        """webui's legacy 8-hex model hash of `file`, from the cache when still fresh."""
        return self.hashes(file).oldhash

    def hashes(self, file: Path) -> FileHashes:
        """Both hashes of `file`; hashes (and persists) only on a miss or a stale entry."""
        key = self.key(file)
        size, probe = fingerprint(Path(file))
        entry = self._fresh(key, size, probe, ("sha256", "oldhash"))
        if entry is not None:
            return FileHashes(sha256=entry["sha256"], oldhash=entry["oldhash"])
        logger.info("hashing %s (%.1f MiB)", key, size / HASH_BLOCK)
        result = hash_file(Path(file))
        self.bytes_hashed += size
        self.put(file, result)
        return result

    def put(self, file: Path, hashes: FileHashes) -> None:
        """Record hashes computed elsewhere (e.g. while verifying a download) and persist."""
        size, probe = fingerprint(Path(file))
        self._entries[self.key(file)] = {
            "size": size,
            "probe": probe,
            "sha256": hashes.sha256,
            "oldhash": hashes.oldhash,
        }
        self._save()

    def cached(self, file: Path, kind: str, compute: Callable[[Path], str]) -> str:
        """Another digest of `file` (e.g. a LoRA's addnet hash), cached the same way: kept
        while size and probe are unchanged, recomputed (and persisted) otherwise."""
        key = f"{self.key(file)}#{kind}"
        size, probe = fingerprint(Path(file))
        entry = self._fresh(key, size, probe, ("value",))
        if entry is not None:
            return str(entry["value"])
        value = compute(Path(os.path.abspath(file)))
        self._entries[key] = {"size": size, "probe": probe, "value": value}
        self._save()
        return value

    def _fresh(
        self, key: str, size: int, probe: str, fields: tuple[str, ...]
    ) -> dict[str, Any] | None:
        """The entry for `key` if it matches the file's size and probe and holds `fields`."""
        entry = self._entries.get(key)
        if (
            isinstance(entry, dict)
            and entry.get("size") == size
            and entry.get("probe") == probe
            and all(isinstance(entry.get(f), str) for f in fields)
        ):
            return entry
        return None

    @staticmethod
    def _load(path: Path) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("hash cache %s is unreadable (%s); starting empty", path, exc)
            return {}
        if not isinstance(data, dict):
            logger.warning("hash cache %s is not a JSON object; starting empty", path)
            return {}
        return data

    def _save(self) -> None:
        # Written after every new hash: an interrupted scan of many large files keeps
        # what it already paid for. Atomic replace, so a reader never sees half a file.
        if self.path is None or not self._writable:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".hashes-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(self._entries, fh, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            self._writable = False
            logger.warning(
                "cannot write hash cache %s (%s); keeping hashes in memory only", self.path, exc
            )


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint under the names webui gives it (`sd_models.CheckpointInfo`)."""

    filename: Path  # absolute
    name: str  # relative path with extension, "/" separators
    name_for_extra: str  # basename without extension
    model_name: str  # relative path without extension, "/" and "\\" -> "_"
    sha256: str | None  # None for a diffusers folder
    shorthash: str | None  # sha256[:10]
    oldhash: str | None  # webui legacy 8-hex hash
    title: str  # "name [shorthash]", or just name without a hash
    is_folder: bool
    config: Path | None = None  # same-name .yaml beside the file, found at scan time

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every id webui's `CheckpointInfo.ids` accepts, in webui's order, without duplicates."""
        ids: list[str | None] = [
            self.oldhash,
            self.model_name,
            self.title,
            self.name,
            self.name_for_extra,
            f"{self.name} [{self.oldhash}]" if self.oldhash else None,
            self.shorthash,
            self.sha256,
            f"{self.name} [{self.shorthash}]" if self.shorthash else None,
            f"{self.name_for_extra} [{self.shorthash}]" if self.shorthash else None,
        ]
        return tuple(dict.fromkeys(i for i in ids if i))

    def listing(self) -> dict[str, Any]:
        """This checkpoint as an entry of `GET /sdapi/v1/sd-models`."""
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.shorthash,
            "sha256": self.sha256,
            "filename": str(self.filename),
            "config": str(self.config) if self.config else None,
        }


def checkpoint_info(
    filename: Path,
    rel: str,
    *,
    is_folder: bool,
    hashes: FileHashes | None,
    config: Path | None = None,
) -> CheckpointInfo:
    """Build the webui names of a checkpoint at `filename`, `rel` being its relative path."""
    base = rel.rsplit("/", 1)[-1]
    # webui strips the extension with splitext; a diffusers folder has no extension to strip.
    stem = base if is_folder else os.path.splitext(base)[0]
    flat = rel.replace("/", "_").replace("\\", "_")
    model_name = flat if is_folder else os.path.splitext(flat)[0]
    sha = hashes.sha256 if hashes else None
    short = sha[:10] if sha else None
    return CheckpointInfo(
        filename=filename,
        name=rel,
        name_for_extra=stem,
        model_name=model_name,
        sha256=sha,
        shorthash=short,
        oldhash=hashes.oldhash if hashes else None,
        title=f"{rel} [{short}]" if short else rel,
        is_folder=is_folder,
        config=config,
    )


# --------------------------------------------------------------------------- walking


@dataclass(frozen=True)
class _Found:
    path: Path  # absolute, not resolved (what webui shows as filename)
    rel: str  # "/" separated, relative to the walked folder
    is_folder: bool


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _walk(
    root: Path,
    suffixes: frozenset[str],
    *,
    diffusers_folders: bool,
) -> Iterator[_Found]:
    """Model files under `root` (and diffusers folders if asked), unsorted.

    Skips hidden entries and anything whose resolved path leaves `root` (a symlink
    out of the model folder), and never descends into a diffusers folder.
    """
    if not root.is_dir():
        return
    root_real = os.path.realpath(root)
    # (folder, its relative prefix, the real paths of it and its ancestors)
    stack: list[tuple[Path, str, frozenset[str]]] = [(root, "", frozenset({root_real}))]
    while stack:
        folder, prefix, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            logger.warning("cannot list %s (%s); skipped", folder, exc)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if not _inside(entry.path, root_real):
                logger.warning("%s points outside %s; skipped", entry.path, root)
                continue
            path = Path(entry.path)
            if entry.is_dir():
                if diffusers_folders and (path / DIFFUSERS_MARKER).is_file():
                    yield _Found(path, rel, is_folder=True)
                    continue
                real = os.path.realpath(path)
                if real not in ancestors:  # a symlink back up the tree would loop forever
                    stack.append((path, rel + "/", ancestors | {real}))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in suffixes:
                yield _Found(path, rel, is_folder=False)


def _sorted(found: Iterator[_Found]) -> list[_Found]:
    # webui sorts its model list case-insensitively; the raw name breaks ties.
    return sorted(found, key=lambda f: (f.rel.lower(), f.rel))


def _config_beside(found: _Found, root_real: str) -> Path | None:
    if found.is_folder:
        return None
    yaml = found.path.with_suffix(".yaml")
    if yaml.is_file() and _inside(str(yaml), root_real):
        return yaml
    return None


# --------------------------------------------------------------------------- catalog


# Full ids name one file; short ids (a basename, a hash prefix) may be shared by two
# files. webui lets the last registered file win such a clash; we let a full id beat a
# short one, and otherwise the first file by name, so an exact title always gets its file.
def _full_ids(info: CheckpointInfo) -> set[str | None]:
    return {
        info.title,
        info.name,
        info.sha256,
        f"{info.name} [{info.oldhash}]" if info.oldhash else None,
        f"{info.name} [{info.shorthash}]" if info.shorthash else None,
    }


def _alias_table(checkpoints: tuple[CheckpointInfo, ...]) -> dict[str, CheckpointInfo]:
    full: dict[str, CheckpointInfo] = {}
    short: dict[str, CheckpointInfo] = {}
    for info in checkpoints:
        strong = _full_ids(info)
        for alias in info.aliases:
            table = full if alias in strong else short
            if alias in table and table[alias] is not info:
                logger.debug(
                    "checkpoint alias %r is shared by %s and %s; it names the first",
                    alias,
                    table[alias].name,
                    info.name,
                )
            table.setdefault(alias, info)
    return {**short, **full}


@dataclass(frozen=True)
class Catalog:
    """An immutable snapshot of the model folders under `models_dir`."""

    models_dir: Path
    checkpoints: tuple[CheckpointInfo, ...]
    other_files: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    _aliases: Mapping[str, CheckpointInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_aliases", _alias_table(self.checkpoints))

    @classmethod
    def scan(cls, models_dir: Path, *, hash_cache: HashCache | None = None) -> Catalog:
        """Walk `models_dir` and hash every checkpoint file (through `hash_cache`)."""
        models_dir = Path(os.path.abspath(models_dir))
        cache = hash_cache if hash_cache is not None else HashCache(None)
        ckpt_root = models_dir / CHECKPOINT_DIR
        ckpt_real = os.path.realpath(ckpt_root)
        infos = []
        for found in _sorted(_walk(ckpt_root, CHECKPOINT_SUFFIXES, diffusers_folders=True)):
            infos.append(
                checkpoint_info(
                    found.path,
                    found.rel,
                    is_folder=found.is_folder,
                    hashes=None if found.is_folder else cache.hashes(found.path),
                    config=_config_beside(found, ckpt_real),
                )
            )
        others = {
            kind: tuple(
                f.path
                for f in _sorted(
                    _walk(
                        models_dir / folder,
                        KIND_SUFFIXES.get(kind, FILE_SUFFIXES),
                        diffusers_folders=False,
                    )
                )
            )
            for kind, folder in FILE_KINDS.items()
        }
        logger.info(
            "catalog: %d checkpoint(s) in %s; %s",
            len(infos),
            ckpt_root,
            ", ".join(f"{len(v)} {k}" for k, v in others.items()),
        )
        return cls(models_dir=models_dir, checkpoints=tuple(infos), other_files=others)

    @property
    def titles(self) -> list[str]:
        """Checkpoint titles in listing order (what error messages offer)."""
        return [c.title for c in self.checkpoints]

    def resolve_checkpoint(
        self, name: str, *, field: str = "override_settings.sd_model_checkpoint"
    ) -> CheckpointInfo:
        """The checkpoint a request names, by exact match on any webui alias.

        Unlike webui, which silently keeps the current model, an unknown name raises
        `UnknownName` naming `field`, the value and the available titles.
        """
        info = self._aliases.get(name) if isinstance(name, str) else None
        if info is None:
            raise UnknownName(field, name, self.titles, kind="checkpoint")
        return info

    def default_checkpoint(
        self, preferred: str | None = None, *, setting: str = "sd_model_checkpoint"
    ) -> CheckpointInfo:
        """The checkpoint to serve when a request names none.

        `preferred` (the value of `setting`) is resolved like a request name; without
        it, the first checkpoint by name. Raises `ModelLoadError` when `preferred` is
        unknown or there is no checkpoint at all.
        """
        where = self.models_dir / CHECKPOINT_DIR
        if not self.checkpoints:
            raise ModelLoadError(
                f"no checkpoint found in {where}: put a .safetensors (or .ckpt/.pt) file or a "
                f"diffusers folder (one with {DIFFUSERS_MARKER}) there, or point SD_MODELS_DIR "
                "at a folder whose checkpoints/ holds one"
            )
        if preferred is None:
            return self.checkpoints[0]
        info = self._aliases.get(preferred)
        if info is None:
            raise ModelLoadError(
                f"{setting}: got {preferred!r}, which names no checkpoint in {where}; "
                f"available: {show_choices(self.titles)}"
            )
        return info

    def sd_models_listing(self) -> list[dict[str, Any]]:
        """`GET /sdapi/v1/sd-models`: one entry per checkpoint, in listing order."""
        return [c.listing() for c in self.checkpoints]

    def files(self, kind: str) -> tuple[Path, ...]:
        """Model files of `kind` ("loras", "embeddings", "vae", "controlnet", "upscalers"),
        sorted by name."""
        if kind not in FILE_KINDS:
            raise ValueError(f"kind: got {kind!r}; allowed: {show_choices(FILE_KINDS)}")
        return tuple(self.other_files.get(kind, ()))
