"""LoRA per request on shared pipelines: webui names and hashes, peft adapters switched on/off.

A request's prompt names LoRAs (`<lora:name:te:unet>`). `LoraManager.applied(...)` makes one
cached pipeline compute with exactly those LoRAs at those weights for one generation, and
afterwards with none, bit for bit as before:

- Every LoRA file becomes a peft adapter beside the base weights (diffusers' `load_lora_weights`).
  Nothing is ever fused into the base weights, so no fuse/unfuse arithmetic can drift them.
- Outside `applied()` no adapter is active on any layer. A peft LoRA layer with no active adapter
  returns `base_layer(x)` itself, the same call on the same weights as before any LoRA was loaded.
- Adapters stay loaded (up to `max_cached` per pipeline, least recently used evicted), so a later
  request with the same LoRA, at any weights, reads no file: switching is a walk over the LoRA
  layers that sets their active list and scale (see `_switch` for where the time goes).

Checkpoints may share a text encoder or UNet (engine/pipelines.py). Each has its own manager;
a checkpoint sharing modules has a `lora_scope`, a suffix of its adapter names, so no manager
ever takes, switches, pins or deletes another's adapters in a shared module, and the LoRA state
of a module is recorded on the module (`STATE_ATTR`), so a switch skipped as "already so" is
never fooled by another manager's change. Loads and deletes hold `modules_lock`.

Request values are only looked up in the catalog's name tables; a name is never joined to a path.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import threading
import time
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import HashCache
from .errors import Problem, RequestError, UnknownName
from .infotext import remove_symbols
from .loading import Family, LoadedCheckpoint
from .oom import is_out_of_memory, reported

log = logging.getLogger(__name__)

LORA_SUFFIX = ".safetensors"
HASH_BLOCK = 1 << 20  # stream in 1 MiB blocks
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own bound on its JSON header
ADDNET_HASH_CHARS = 12  # webui's LoRA "shorthash"
# Cover images can be megabytes of base64; newer webui drops them from the listing too.
LISTING_DROPPED_METADATA = frozenset({"ssmd_cover_images"})
# webui (extensions-builtin/Lora/network.py) lists these metadata keys first, in this order.
METADATA_TAGS_ORDER: Mapping[str, int] = {
    "ss_sd_model_name": 1,
    "ss_resolution": 2,
    "ss_clip_skip": 3,
    "ss_num_train_images": 10,
    "ss_tag_frequency": 20,
}
# What a request's LoRA name may not contain: such a name never matches anything.
_PATH_LIKE = ("/", "\\", "..", "\x00")
# Which request weight drives each LoRA-loadable pipeline component.
COMPONENT_WEIGHTS: Mapping[str, str] = {
    "unet": "unet",
    "text_encoder": "te",
    "text_encoder_2": "te",
}
KINDS = ("unet", "te")  # switched separately: text encoding and UNet steps of requests interleave
# On each LoRA-bearing model: the (adapter name, weight) pairs active in its layers as last set.
# Kept on the module, not on a manager: checkpoints sharing a text encoder or UNet
# (engine/pipelines.py) have one manager each, and any of them may have switched it last.
STATE_ATTR = "_webui_lora_state"
ADAPTER_ID_PREFIX = "lora_"
ADAPTER_ID_CHARS = len(ADAPTER_ID_PREFIX) + 24  # the prefix and 24 hex of the file's content id


def _signature(uses: Sequence[LoraUse], kind: str) -> tuple[tuple[str, float], ...]:
    """The (adapter, weight) pairs active in the components of `kind` (zero weights off)."""
    pairs = ((u.info.adapter_id, u.te_weight if kind == "te" else u.unet_weight) for u in uses)
    return tuple((aid, w) for aid, w in pairs if w != 0)


# --------------------------------------------------------------------------- family guess

# sd-scripts' ss_base_model_version / modelspec.architecture prefixes, most specific first.
_METADATA_FAMILIES: tuple[tuple[str, str, Family], ...] = (
    ("ss_base_model_version", "sdxl", Family.SDXL),
    ("ss_base_model_version", "sd_v2", Family.SD2),
    ("ss_base_model_version", "sd_v1", Family.SD1),
    ("modelspec.architecture", "stable-diffusion-xl", Family.SDXL),
    ("modelspec.architecture", "stable-diffusion-v2", Family.SD2),
    ("modelspec.architecture", "stable-diffusion-v1", Family.SD1),
    ("ss_v2", "True", Family.SD2),  # older sd-scripts: no base version, only this flag
)
# Keys only a LoRA for a two-text-encoder model (SDXL) has, in kohya and diffusers layouts.
_SDXL_KEY_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.", "te2.")
# The cross-attention key projection's input width is the text width the UNet was trained on.
_CROSS_ATTENTION_KEY_ENDINGS = (
    "attn2_to_k.lora_down.weight",
    "attn2.to_k.lora_A.weight",
    "attn2.to_k.lora.down.weight",
    "attn2.processor.to_k_lora.down.weight",
)
_CONTEXT_WIDTH_FAMILIES: Mapping[int, Family] = {
    768: Family.SD1,
    1024: Family.SD2,
    2048: Family.SDXL,
}


def guess_family(metadata: Mapping[str, str], shapes: Mapping[str, Sequence[int]]) -> Family | None:
    """The model family a LoRA was trained for: from its metadata, else its keys and shapes.

    None when nothing tells (a tiny or exotic file); such a LoRA is tried and refused only if
    diffusers cannot apply it.
    """
    for key, prefix, family in _METADATA_FAMILIES:
        if str(metadata.get(key, "")).startswith(prefix):
            return family
    if any(k.startswith(_SDXL_KEY_PREFIXES) for k in shapes):
        return Family.SDXL
    for key, shape in shapes.items():
        if key.endswith(_CROSS_ATTENTION_KEY_ENDINGS) and len(shape) >= 2:
            return _CONTEXT_WIDTH_FAMILIES.get(int(shape[1]))
    return None


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class SafetensorsFacts:
    """What one read of a .safetensors file tells: header, shapes and content hashes."""

    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    data_sha256: str  # sha256 of everything after the header: webui's "addnet" hash, in full
    content_id: str  # sha256 over header and data digest: names the exact file content


def _read_header(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        size = int.from_bytes(head, "little")
        if not 2 <= size <= MAX_HEADER_BYTES:
            raise ValueError(f"header length {size} is out of range")
        header_bytes = fh.read(size)
        if len(header_bytes) != size:
            raise ValueError("the header is cut short")
    return header_bytes


def data_sha256(path: Path) -> str:
    """sha256 of everything after the safetensors header (webui's addnet hash, in full)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + size)
        data = hashlib.sha256()
        while block := fh.read(HASH_BLOCK):
            data.update(block)
    return data.hexdigest()


def read_safetensors_facts(path: Path, hash_cache: HashCache | None = None) -> SafetensorsFacts:
    """Parse the header of `path` and hash its tensor data (a full read, unless `hash_cache`
    still holds the digest for this size and mtime).

    Raises ValueError for a file that is not a well-formed safetensors file, OSError when it
    cannot be read.
    """
    header_bytes = _read_header(path)
    header = json.loads(header_bytes)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    raw_meta = header.pop("__metadata__", None)
    metadata = (
        {str(k): v for k, v in raw_meta.items() if isinstance(v, str)}
        if isinstance(raw_meta, dict)
        else {}
    )
    shapes = {
        str(k): tuple(int(n) for n in v["shape"])
        for k, v in header.items()
        if isinstance(v, dict) and isinstance(v.get("shape"), list)
    }
    data_sha = (
        hash_cache.cached(path, "addnet-data-sha256", data_sha256)
        if hash_cache
        else data_sha256(path)
    )
    content_id = hashlib.sha256(header_bytes + bytes.fromhex(data_sha)).hexdigest()
    return SafetensorsFacts(metadata, shapes, data_sha, content_id)


def read_lora_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a LoRA file, on the CPU (the single place a LoRA file is read for loading)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def listing_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Metadata as webui's `/sdapi/v1/loras` shows it: JSON-looking values parsed, tags ordered.

    webui's read_metadata_from_safetensors parses every value starting with "{" as JSON
    (ss_tag_frequency becomes an object) and keeps the text when that fails.
    """
    shown: dict[str, Any] = {}
    ordered = sorted(metadata.items(), key=lambda kv: METADATA_TAGS_ORDER.get(kv[0], 999))
    for key, value in ordered:
        if key in LISTING_DROPPED_METADATA:
            continue
        shown[key] = value
        if value.startswith("{"):
            with suppress(ValueError):
                shown[key] = json.loads(value)
    return shown


# --------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class LoraInfo:
    """One LoRA file under the names and hash webui gives it."""

    name: str  # file name without extension (webui's NetworkOnDisk.name)
    alias: str  # ss_output_name from the metadata, else name
    path: Path  # absolute, as found under the loras folder
    metadata: Mapping[str, str] = field(compare=False)
    # sha256 of the file without its header, first 12 hex (webui's addnet hash); or the
    # sshs_model_hash written by sd-scripts, first 12 characters, when present (webui uses that).
    addnet_hash: str
    family: Family | None  # "sd1" / "sd2" / "sdxl", None when the file does not tell
    # The peft adapter name: derived from the file content, never from a user's string, so it
    # is always a safe module key and two copies of one file share one adapter.
    adapter_id: str
    # "lora" for LoRA/LoCon files; LyCORIS "loha"/"lokr"/"ia3"/"full"/... are listed but
    # refused with a clear error: diffusers' LoRA loader (which we use) only applies LoRA.
    network_type: str = "lora"

    def listing(self) -> dict[str, Any]:
        """This LoRA as an entry of `GET /sdapi/v1/loras`."""
        return {
            "name": self.name,
            "alias": self.alias,
            "path": str(self.path),
            "metadata": listing_metadata(self.metadata),
        }


def lora_info(path: Path, hash_cache: HashCache | None = None) -> LoraInfo:
    """Read `path`'s header and data hash and describe it as webui does."""
    facts = read_safetensors_facts(path, hash_cache)
    name = path.name[: -len(path.suffix)] if path.suffix else path.name
    sshs = facts.metadata.get("sshs_model_hash", "")
    return LoraInfo(
        name=name,
        alias=facts.metadata.get("ss_output_name") or name,
        path=path,
        metadata=dict(facts.metadata),
        addnet_hash=(sshs or facts.data_sha256)[:ADDNET_HASH_CHARS],
        family=guess_family(facts.metadata, facts.shapes),
        adapter_id=(ADAPTER_ID_PREFIX + facts.content_id)[:ADAPTER_ID_CHARS],
        network_type=network_type(facts.shapes),
    )


# Key endings that tell LyCORIS network types apart (LyCORIS's own module names).
_NETWORK_KEYS: tuple[tuple[str, str], ...] = (
    (".hada_w1_a", "loha"),
    (".lokr_w1", "lokr"),
    (".lokr_w1_a", "lokr"),
    (".on_input", "ia3"),
    (".diff", "full"),
    (".oft_blocks", "oft"),
)


def network_type(shapes: Mapping[str, Sequence[int]]) -> str:
    """ "lora" unless the keys are those of another LyCORIS network type."""
    for key in shapes:
        for ending, kind in _NETWORK_KEYS:
            if key.endswith(ending):
                return kind
    return "lora"


def _is_path_like(name: str) -> bool:
    return not name or any(part in name for part in _PATH_LIKE)


@dataclass(frozen=True)
class LoraCatalog:
    """An immutable snapshot of the LoRA files, with webui's name and alias lookup."""

    loras: tuple[LoraInfo, ...]
    _names: Mapping[str, LoraInfo] = field(init=False, repr=False, compare=False)
    _aliases: Mapping[str, LoraInfo] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names: dict[str, LoraInfo] = {}
        for info in self.loras:
            if info.name in names:
                # webui keys LoRAs by bare file name, so two folders with one name clash there
                # too; like the checkpoint catalog, the first by path keeps the name.
                log.warning(
                    "LoRA name %r is used by %s and %s; it names the first",
                    info.name,
                    names[info.name].path,
                    info.path,
                )
                continue
            names[info.name] = info
        # webui's forbidden_network_aliases: an alias two files share, or that is another file's
        # name, names nothing (the file name still works).
        owners: dict[str, set[Path]] = {}
        for info in self.loras:
            owners.setdefault(info.alias, set()).add(info.path)
        aliases = {
            info.alias: info
            for info in self.loras
            if len(owners[info.alias]) == 1
            and (info.alias not in names or names[info.alias] is info)
        }
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_aliases", aliases)

    @classmethod
    def scan(cls, files: Iterable[Path], hash_cache: HashCache | None = None) -> LoraCatalog:
        """Describe the LoRA files among `files` (e.g. `Catalog.files("loras")`), in that order.

        Only .safetensors files are loaded. A .pt/.ckpt/.bin LoRA is skipped with a warning:
        pickles are only ever read through torch's weights-only loader, and diffusers' LoRA
        loader refuses pickles anyway. A file that is not valid safetensors is skipped with a
        warning, so one bad download does not fail setup. With `hash_cache`, a restart reads
        only the headers of unchanged files.
        """
        infos: list[LoraInfo] = []
        for path in files:
            if path.suffix.lower() != LORA_SUFFIX:
                log.warning("LoRA %s skipped: only %s LoRAs are supported", path, LORA_SUFFIX)
                continue
            try:
                infos.append(lora_info(Path(path), hash_cache))
            except (OSError, ValueError) as exc:
                log.warning("LoRA %s skipped: not a readable safetensors file (%s)", path, exc)
        log.info("LoRA catalog: %d file(s)", len(infos))
        return cls(tuple(infos))

    @property
    def choices(self) -> list[str]:
        """Every name a request may use: file names, then the aliases that differ from them."""
        return list(dict.fromkeys([*self._names, *self._aliases]))

    def resolve(self, name: str, *, field: str = "prompt") -> LoraInfo:
        """The LoRA a request names: its file name without extension, or its alias.

        Never a path: a name holding "/", "\\", ".." or NUL matches nothing. An unknown name
        raises `UnknownName` listing close matches first, then every other name.
        """
        if isinstance(name, str) and not _is_path_like(name):
            info = self._names.get(name) or self._aliases.get(name)
            if info is not None:
                return info
        choices = self.choices
        close = (
            difflib.get_close_matches(name, choices, n=5, cutoff=0.5)
            if isinstance(name, str)
            else []
        )
        ordered = close + [c for c in choices if c not in close]
        raise UnknownName(field, name, ordered, kind="LoRA")

    def listing(self) -> list[dict[str, Any]]:
        """`GET /sdapi/v1/loras`: one entry per LoRA file, in scan order."""
        return [info.listing() for info in self.loras]


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class LoraRequest:
    """One `<lora:name:te:unet>` tag of a prompt, as parsed (webui: unet defaults to te)."""

    name: str
    te_weight: float
    unet_weight: float


@dataclass(frozen=True)
class LoraUse:
    """The total weights one adapter gets in a generation."""

    info: LoraInfo
    te_weight: float
    unet_weight: float


def combine_requests(pairs: Sequence[tuple[LoraInfo, LoraRequest]]) -> list[LoraUse]:
    """Total weight per adapter, the way webui's Lora extension ends up applying them.

    webui keeps one Network object per name *as written*: the same name twice in a prompt is
    that one object listed twice, whose multipliers the last mention overwrote, so its delta
    is added twice at the LAST weights (`<lora:x:0.2> <lora:x:0.6>` -> 1.2). Different
    spellings of one file (its name and its alias) are separate objects, each at its own
    weights, so they add up. LoRA deltas are linear in the weight, so one adapter at the summed
    weight computes the same thing. Order: by first mention.
    """
    mentions: dict[str, tuple[LoraInfo, LoraRequest, int]] = {}
    for info, req in pairs:
        count = mentions[req.name][2] + 1 if req.name in mentions else 1
        mentions[req.name] = (info, req, count)
    totals: dict[str, LoraUse] = {}
    for info, req, count in mentions.values():
        prev = totals.get(info.adapter_id)
        te = count * req.te_weight + (prev.te_weight if prev else 0.0)
        unet = count * req.unet_weight + (prev.unet_weight if prev else 0.0)
        totals[info.adapter_id] = LoraUse(prev.info if prev else info, te, unet)
    return list(totals.values())


def lora_hashes(pairs: Sequence[tuple[LoraInfo, LoraRequest]]) -> str | None:
    """webui's "Lora hashes" infotext value: `name: hash, ...`, None when there is none.

    Keyed by the name as written in the prompt with ":" and "," removed (webui's
    remove_symbols), first mention order, one entry per name.
    """
    hashes = {remove_symbols(req.name): info.addnet_hash for info, req in pairs if info.addnet_hash}
    return ", ".join(f"{k}: {v}" for k, v in hashes.items()) or None


# --------------------------------------------------------------------------- peft plumbing


def _tuner_layer_class() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def _set_active(layer: Any, names: list[str]) -> None:
    """Make `names` the active adapters of one peft layer.

    This is peft's `BaseTunerLayer.set_adapter(names, inference_mode=True)` without its
    requires_grad sweep over every adapter the layer holds: that sweep is O(cached adapters)
    per layer (tens of ms for a full SDXL LoRA with a few cached), and inference needs no
    gradients (they are switched off once, at load). The attribute is the one peft's own
    `active_adapter` property reads; tests/test_networks.py checks that through the property.

    Why not the public API (peft 0.21.2 offers no other way to switch: `active_adapter` is a
    read-only property "set with set_adapter"): `scripts/bench_lora.py --peft-public` swaps
    this function for `layer.set_adapter(names, inference_mode=True)`. Measured on the tiny
    SD1 (2 idle cores, 2026-12-03): a cached switch 49.8 ms instead of 1.75 ms (diffusers' own
    set_adapters: 35 ms, so the ratio goes from 0.05 to 1.42), a weight-only change 45.3 ms
    instead of 0.9 ms, the way back to the plain model 25.0 ms instead of 0.7 ms, and the
    switch grows 2.7x from 2 to 8 cached adapters instead of 0.98x. It does not raise (with
    or without names a layer lacks); the earlier "hang" was tests/test_networks.py
    test_switching_cached_loras_walks_no_modules, which forbids set_adapter on the switching
    path, raising inside the manager's finally while the lock was not yet released there.
    Upstream knows the cost: huggingface/diffusers#11816 (set_adapters slows with every
    inactive adapter ever loaded), huggingface/peft#981 (set_adapter loops over every
    adapter's ModuleDict).
    """
    if layer.disable_adapters:  # someone called disable_lora(); we switch per layer instead
        layer.enable_adapters(True)
    layer._active_adapter = names


def _brief(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Capture(logging.Filter):
    """Keeps the records of one logger instead of letting them through."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


@contextmanager
def _quiet_adapter_loading() -> Iterator[list[str]]:
    """Hold back two misleading messages that every second adapter load prints.

    transformers logs a "LOAD REPORT" calling the *other* adapters' text-encoder weights
    MISSING and "newly initialized"; they are untouched (tests check outputs). peft warns that
    the model already has a peft_config, which is what keeping a cache of adapters means. The
    report is yielded, so that a failed load can still explain itself.
    """
    tf_logger = logging.getLogger("transformers.integrations.peft")
    capture = _Capture()
    tf_logger.addFilter(capture)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Already found a `peft_config`")
            yield capture.messages
    finally:
        tf_logger.removeFilter(capture)


def _load_failure(exc: BaseException, report: Sequence[str]) -> str:
    """Why a load failed, in words a user can act on (transformers points at its report)."""
    if any("MISMATCH" in message for message in report):
        return "its tensor shapes do not fit this checkpoint's layers; is it for another model?"
    return _brief(exc)


# --------------------------------------------------------------------------- manager


class LoraManager:
    """The LoRA adapters of one loaded checkpoint.

    Holds at most `max_cached` adapters (least recently used first out; adapters a request in
    flight uses are never evicted). `prepared()` loads a request's adapters and `activate()`
    switches them on; several requests may hold prepared adapters at once while the engine's
    turns (engine/step_batcher.py) switch between them. `applied()` is the one-generation form.
    Do not pass `cross_attention_kwargs={"scale": ...}` to the pipeline: weights are set here.
    """

    def __init__(
        self, loaded: LoadedCheckpoint, catalog: LoraCatalog, *, max_cached: int = 8
    ) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached: got {max_cached!r}; must be at least 1")
        self.loaded = loaded
        self.scope = loaded.lora_scope  # suffix of this checkpoint's adapter names
        self.catalog = catalog  # swap in a rescanned catalog for /refresh-loras
        self.max_cached = max_cached
        self._cache: OrderedDict[str, LoraInfo] = OrderedDict()  # adapter id -> file, LRU first
        self._layers: dict[str, tuple[Any, ...]] = {}  # component -> its peft LoRA layers
        self._present: dict[str, frozenset[str]] = {}  # component -> adapter names it holds
        self._busy = threading.Lock()  # applied(): one generation at a time
        self._pinned: Counter[str] = Counter()  # adapter id -> requests using it now
        # Held while adapters are loaded into or deleted from the layers. The engine makes it
        # the step batcher's text-encoder lock, so that no request's text encoding runs through
        # layers being changed (UNet layers change under the engine's turn, held by the caller).
        self.modules_lock: Any = threading.RLock()
        # The device working set's hooks (engine/working_set.py, wired in lora_memory.py):
        # before a file loads, and for every adapter a request uses; None: no budget.
        self.before_load: Callable[[LoraInfo], None] | None = None
        self.on_use: Callable[[LoraInfo], None] | None = None
        self._retired = False  # see retire()
        self._reindex()

    # ---- public

    @contextmanager
    def applied(
        self, requests: Sequence[LoraRequest], *, field: str = "prompt"
    ) -> Iterator[list[tuple[LoraInfo, LoraRequest]]]:
        """Run the body with exactly `requests` active; afterwards no adapter is active.

        The one-generation-at-a-time form (scripts, tests): a second `applied()` while one is
        open raises. The engine uses `prepared()` and switches per turn instead
        (engine/step_batcher.py), so that several requests can hold their LoRAs at once.
        Yields the (file, request) pairs in request order (for the infotext).
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                f"LoRAs of {self.loaded.info.title} are already applied to another generation"
            )
        try:
            with self.prepared(requests, field=field) as (pairs, uses):
                try:
                    self.activate(uses)
                    yield pairs
                finally:
                    self.deactivate()
        finally:
            self._busy.release()

    @contextmanager
    def prepared(
        self, requests: Sequence[LoraRequest], *, field: str = "prompt"
    ) -> Iterator[tuple[list[tuple[LoraInfo, LoraRequest]], list[LoraUse]]]:
        """Resolve `requests` and load their adapters; they stay cached (never evicted) until
        the body ends. Yields the (file, request) pairs and the adapter uses to `activate`.

        Raises `RequestError` (all problems at once) before touching the pipeline for unknown
        names, non-finite weights and LoRAs of another model family; a file that fails to load
        raises `RequestError` and leaves only the adapters that were there before. The caller
        holds the engine's turn (no two requests change the pipeline at once).
        """
        # 1. Resolve and check everything first: a bad request never touches the pipeline.
        pairs = self.resolve(requests, field)
        # A LoRA at weight 0 everywhere changes nothing: not even loaded (webui loads it).
        uses = [u for u in combine_requests(pairs) if u.te_weight or u.unet_weight]
        if not uses:
            yield pairs, []
            return
        pinned = [u.info.adapter_id for u in uses]
        self._pinned.update(pinned)
        try:
            # 2. Load what is not cached (the only step that reads files).
            self._ensure_loaded(uses, field)
            # 3. Generate (the caller activates them, turn by turn).
            yield pairs, uses
        finally:
            # 4. Always (errors, cancellation: BaseException too): unpinned, cache trimmed.
            self._pinned.subtract(pinned)
            self._pinned += Counter()  # drop zero counts
            self._trim()

    def activate(self, uses: Sequence[LoraUse], kinds: Sequence[str] = KINDS) -> None:
        """Exactly `uses` active at their weights in the components of `kinds` ("unet", "te";
        nothing for an empty list). A component already in that state costs nothing."""
        for kind in kinds:
            started = time.perf_counter()
            switched = [c for c in self._components(kind) if self._switch(c, uses, kind)]
            if switched:
                log.debug(
                    "LoRA %s activate %s in %.2f ms",
                    ", ".join(switched),
                    ", ".join(f"{aid}({w})" for aid, w in _signature(uses, kind)) or "(none)",
                    (time.perf_counter() - started) * 1e3,
                )

    def adapter_name(self, adapter_id: str) -> str:
        """The peft adapter name of a LoRA on this checkpoint (its id, scoped when the
        checkpoint shares some LoRA-bearing modules with another: engine/pipelines.py)."""
        return f"{adapter_id}_{self.scope}" if self.scope else adapter_id

    def deactivate(self, kinds: Sequence[str] = KINDS) -> None:
        """No adapter active in the components of `kinds` (the base model there)."""
        self.activate([], kinds)

    def drop(self, adapter_id: str) -> bool:
        """Delete one cached adapter (the working set's eviction under SD_DEVICE_MEMORY); False
        while any request uses this checkpoint's LoRAs (it is then left alone)."""
        if self._pinned or not self._busy.acquire(blocking=False):
            return False
        try:
            if not self.modules_lock.acquire(blocking=False):
                return False  # a text encoding runs through these layers now
            try:
                if adapter_id in self._cache:
                    self._evict(adapter_id)
                return True
            finally:
                self.modules_lock.release()
        finally:
            self._busy.release()

    def retire(self) -> None:
        """A refresh dropped this checkpoint: delete its adapters now, and those a request in
        flight still uses when that request ends. Where its modules are shared with a kept
        checkpoint (engine/pipelines.py) they would otherwise stay in the kept one's layers
        for as long as the process runs. The caller holds the engine's turn."""
        self._retired = True
        self._trim()

    def cached(self) -> list[str]:
        """Names of the LoRAs held as adapters, least recently used first."""
        return [info.name for info in self._cache.values()]

    def clear(self) -> None:
        """Drop every adapter and the peft wrappers: the pipeline is as loaded from disk.

        For /refresh-loras or memory pressure; never while a generation is running.
        """
        with self._busy, self.modules_lock:
            if self._pinned:
                raise RuntimeError(f"LoRAs of {self.loaded.info.title} are in use")
            self._reindex()
            self._deactivate()
            mine = [n for held in self._present.values() for n in held if self._owns(n)]
            if mine:
                self.loaded.pipe.delete_adapters(list(dict.fromkeys(mine)))
            self._unwrap_if_empty()
            self._cache.clear()
            self._reindex()

    # ---- steps

    def resolve(
        self, requests: Sequence[LoraRequest], field: str
    ) -> list[tuple[LoraInfo, LoraRequest]]:
        problems: list[Problem] = []
        unknown: list[UnknownName] = []
        pairs: list[tuple[LoraInfo, LoraRequest]] = []
        family = self.loaded.family
        for req in requests:
            try:
                info = self.catalog.resolve(req.name, field=field)
            except UnknownName as exc:
                unknown.append(exc)
                problems.extend(exc.problems)
                continue
            if info.network_type != "lora":
                problems.append(
                    Problem(
                        field,
                        req.name,
                        f"is a LyCORIS {info.network_type.upper()} file; this server applies LoRA "
                        "and LoCon files only (diffusers/peft cannot load this type as a LoRA)",
                    )
                )
                continue
            weights = (req.te_weight, req.unet_weight)
            if not all(isinstance(w, int | float) and math.isfinite(w) for w in weights):
                problems.append(
                    Problem(
                        field,
                        f"<lora:{req.name}:{req.te_weight}:{req.unet_weight}>",
                        "LoRA weights must be finite numbers",
                    )
                )
                continue
            if info.family is not None and info.family != family:
                problems.append(
                    Problem(
                        field,
                        req.name,
                        f"this LoRA is for {info.family} models but checkpoint "
                        f"{self.loaded.info.title!r} is {family}; use a LoRA made for {family}",
                    )
                )
                continue
            pairs.append((info, req))
        if len(unknown) == 1 and len(problems) == 1:
            raise unknown[0]
        if problems:
            raise RequestError(problems)
        return pairs

    def _resync(self) -> None:
        """Other code (another manager on the same pipeline, diffusers' own calls) may have
        added or removed adapters: forget cached ones that are gone, find the layers again.
        The check is a dict comparison (no module walk) unless something changed."""
        present = self._present_now()
        if present == self._present:
            return
        alive: set[str] = set().union(*present.values()) if present else set()
        for aid in [a for a in self._cache if self.adapter_name(a) not in alive]:
            del self._cache[aid]
        self._reindex()

    def _ensure_loaded(self, uses: Sequence[LoraUse], field: str) -> None:
        with self.modules_lock:
            self._ensure_loaded_locked(uses, field)

    def _ensure_loaded_locked(self, uses: Sequence[LoraUse], field: str) -> None:
        self._resync()
        needed = {u.info.adapter_id for u in uses}
        for use in uses:
            aid = use.info.adapter_id
            if aid in self._cache:
                self._cache.move_to_end(aid)
            else:
                self._make_room(keep=needed | set(self._pinned), incoming=1)
                if self.before_load is not None:
                    self.before_load(use.info)
                with reported(f"loading LoRA {use.info.name}", "try fewer or smaller LoRAs"):
                    self._load(use.info, field)
            if self.on_use is not None:
                self.on_use(use.info)

    def _load(self, info: LoraInfo, field: str) -> None:
        """Load one file as adapter `info.adapter_id`; on any failure leave no trace of it."""
        aid, name = info.adapter_id, self.adapter_name(info.adapter_id)
        started = time.perf_counter()
        if any(name in held for held in self._present_now().values()):
            # Already in the pipeline (ids name file content, so it is this very file; the
            # scope makes it this checkpoint's, left by an earlier manager of it): adopt.
            self._reindex()
            self._freeze_and_rest()
            self._cache[aid] = info
            return
        try:
            state = read_lora_state_dict(info.path)
        except Exception as exc:  # any read failure is this file's problem
            if is_out_of_memory(exc):
                raise
            raise RequestError.single(
                field, info.name, f"the LoRA file cannot be read ({_brief(exc)})"
            ) from exc
        loaded = False
        report: list[str] = []
        try:
            # The cost of a first use: peft walks every module to inject the LoRA layers.
            with _quiet_adapter_loading() as report:
                self.loaded.pipe.load_lora_weights(state, adapter_name=name)
            self._reindex()
            if not any(name in held for held in self._present.values()):
                raise RequestError.single(
                    field,
                    info.name,
                    f"no layer of checkpoint {self.loaded.info.title!r} matches this LoRA's "
                    "weights; use a LoRA made for this model",
                )
            loaded = True
        except RequestError:
            raise
        except Exception as exc:  # diffusers/peft raise many types for bad files
            if is_out_of_memory(exc):
                raise  # not the file's fault (engine/oom.py reports it); finally discards
            for message in report:
                log.warning("LoRA %s: %s", info.name, message)
            raise RequestError.single(
                field,
                info.name,
                f"this LoRA cannot be applied to checkpoint {self.loaded.info.title!r} "
                f"({_load_failure(exc, report)})",
            ) from exc
        finally:
            if loaded:
                self._freeze_and_rest()
                self._cache[aid] = info
            else:
                self._discard(aid)
        log.info(
            "LoRA %s loaded on %s in %.2f s (%d cached)",
            info.name,
            self.loaded.info.title,
            time.perf_counter() - started,
            len(self._cache),
        )

    def _components(self, kind: str) -> list[str]:
        return [c for c in self._layers if COMPONENT_WEIGHTS[c] == kind]

    def _wanted(self, component: str, uses: Sequence[LoraUse], kind: str) -> tuple[Any, ...]:
        held = self._present.get(component, frozenset())
        named = ((self.adapter_name(aid), w) for aid, w in _signature(uses, kind))
        # A zero weight leaves the adapter off in this component: exactly the base path.
        return tuple((name, w) for name, w in named if name in held)

    def _switch(self, component: str, uses: Sequence[LoraUse], kind: str) -> bool:
        """Set one component's LoRA state; False when it is in that state already.

        The whole cost of a switch: one pass over the component's LoRA layers (a few hundred
        to about a thousand for SDXL), each getting a new active list and one set_scale per
        active adapter. No module walk, no file, and independent of how many adapters are
        cached."""
        model = getattr(self.loaded.pipe, component)
        if getattr(model, STATE_ATTR, None) == self._wanted(component, uses, kind):
            return False
        self._resync()  # a checkpoint sharing this module may have loaded into it
        wanted = self._wanted(component, uses, kind)
        names = [name for name, _ in wanted]
        for layer in self._layers.get(component, ()):
            _set_active(layer, names)
            for name, weight in wanted:
                layer.set_scale(name, weight)  # alpha/rank * weight; ignores absent adapters
        setattr(model, STATE_ATTR, wanted)
        return True

    def _deactivate(self) -> None:
        # O(LoRA layers), attribute writes only: cannot fail halfway through.
        self._resync()
        for component, layers in self._layers.items():
            for layer in layers:
                _set_active(layer, [])
            setattr(getattr(self.loaded.pipe, component), STATE_ATTR, ())

    def _make_room(self, keep: set[str], incoming: int) -> None:
        room = 0 if self._retired else self.max_cached
        while len(self._cache) + incoming > room:
            victim = next((aid for aid in self._cache if aid not in keep), None)
            if victim is None:
                return  # one request needs more than max_cached; trimmed after it
            self._evict(victim)

    def _trim(self) -> None:
        try:
            with self.modules_lock:
                self._make_room(keep=set(self._pinned), incoming=0)
                if self._retired and not self._cache:
                    self._unwrap_if_empty()
        except Exception:  # must not hide the generation's own outcome
            log.exception("LoRA cache trim on %s failed", self.loaded.info.title)

    def _evict(self, aid: str) -> None:
        info = self._cache.pop(aid)
        self._deactivate()
        self.loaded.pipe.delete_adapters([self.adapter_name(aid)])
        self._reindex()
        log.info("LoRA %s evicted from %s", info.name, self.loaded.info.title)

    def _discard(self, aid: str) -> None:
        """Remove a half-loaded adapter (diffusers loads the UNet part before the text encoders)."""
        self._reindex()
        self._deactivate()
        try:
            self.loaded.pipe.delete_adapters([self.adapter_name(aid)])
            self._unwrap_if_empty()
        except Exception:  # report the load failure, not the cleanup's
            log.exception("cleaning up failed LoRA adapter %s failed", aid)
        self._reindex()

    def _freeze_and_rest(self) -> None:
        # peft leaves a new adapter active (and trainable) on the layers it wraps; switch
        # every adapter off and freeze its weights once, here, where time is spent anyway.
        for layers in self._layers.values():
            for layer in layers:
                layer.set_adapter(layer.active_adapters, inference_mode=True)
        self._deactivate()

    def _owns(self, name: str) -> bool:
        """Whether an adapter name in the layers is one of this checkpoint's (its scope)."""
        return self.adapter_name(name[:ADAPTER_ID_CHARS]) == name

    def _unwrap_if_empty(self) -> None:
        """No adapter left in any component (of any checkpoint sharing them): drop the empty
        peft wrappers too, so the modules are as loaded from disk."""
        if any(self._layers.values()) and not any(self._present_now().values()):
            self.loaded.pipe.unload_lora_weights()

    def _present_now(self) -> dict[str, frozenset[str]]:
        # peft_config lives on each model: a dict lookup, no module walk.
        return {
            component: frozenset(getattr(model, "peft_config", None) or ())
            for component in COMPONENT_WEIGHTS
            if (model := getattr(self.loaded.pipe, component, None)) is not None
        }

    def _reindex(self) -> None:
        """Find the peft LoRA layers of each component (after loads and deletes only)."""
        tuner = _tuner_layer_class()
        self._layers, self._present = {}, {}
        for component in COMPONENT_WEIGHTS:
            model = getattr(self.loaded.pipe, component, None)
            if model is None:
                continue
            self._layers[component] = tuple(m for m in model.modules() if isinstance(m, tuner))
        self._present = self._present_now()
