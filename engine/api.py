"""The engine's front door: setup once, then one call per request, by webui endpoint name."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .catalog import Catalog, HashCache
from .device import choose_placement, describe
from .embeddings import EmbeddingCatalog
from .errors import ModelLoadError, RequestError
from .extensions import ExtensionRegistry
from .extras import EXTRAS_ENDPOINTS, run_extras
from .fetch import fetch_from_env
from .generate import generate, log_progress
from .geometry import available_hr_upscalers
from .images import EncodedImage
from .listings import INSPECTORS, LISTINGS
from .loading import Placement
from .memory_release import configure_allocator, release_host_memory
from .networks import LoraCatalog
from .passes import Progress
from .payload import Limits, ParsedRequest, choose_mode, decode_api_json, parse_request
from .pipelines import PipelineCache
from .planning import Models
from .playground import merge_playground
from .refresh import rescan
from .response import Result
from .step_batcher import CONCURRENCY_ENV, MAX_ROWS_ENV, max_rows_from_env, sessions_from_env
from .upscaler_models import UpscalerCatalog
from .vae import VaeCatalog
from .working_set import (
    BUDGET_ENV,
    DeviceBusy,
    WorkingSet,
    budget_from_env,
    gib,
    pinned_limit_from_env,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# How long a request whose models do not fit beside running requests waits for one to end.
BUSY_WAIT_S = 600.0


@dataclass(frozen=True)
class EngineConfig:
    """Where models live and which checkpoint a request without one gets."""

    models_dir: Path
    cache_dir: Path
    default_checkpoint: str | None = None
    # SD_FETCH_MODELS=1: this manifest's files are fetched (and verified) at setup.
    fetch_manifest: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineConfig:
        """SD_MODELS_DIR (default: the repository root), SD_CACHE_DIR (default:
        <models dir>/.cache), SD_DEFAULT_CHECKPOINT (default: the first checkpoint by name),
        SD_FETCH_MODELS=1 with SD_MODELS_MANIFEST (default: models.toml of this repository)."""
        env = os.environ if environ is None else environ
        models = Path(env.get("SD_MODELS_DIR") or REPO_ROOT).resolve()
        cache = Path(env.get("SD_CACHE_DIR") or models / ".cache").resolve()
        manifest = None
        if env.get("SD_FETCH_MODELS", "").strip() == "1":
            manifest = Path(env.get("SD_MODELS_MANIFEST") or REPO_ROOT / "models.toml")
        return cls(models, cache, env.get("SD_DEFAULT_CHECKPOINT") or None, manifest)


@dataclass
class Response:
    """What an endpoint returns: generated images with webui's `info`, or listing JSON."""

    images: list[EncodedImage] = field(default_factory=list)
    info: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    listing: Any = None

    @property
    def seed(self) -> int | None:
        """The first image's seed (webui's `info.seed`); None for a listing."""
        if not self.info.startswith("{"):
            return None  # a listing, or the extras endpoints' html_info
        seed = json.loads(self.info).get("seed")
        return seed if isinstance(seed, int) else None


GENERATION_ENDPOINTS = ("auto", "txt2img", "img2img")
# Listings (engine/listings.py) answer JSON; png-info reads `api_json` too.
# The extras endpoints (engine/extras.py) answer images and webui's html_info.
ENDPOINTS = GENERATION_ENDPOINTS + EXTRAS_ENDPOINTS + tuple(LISTINGS) + tuple(INSPECTORS)


class Engine:
    """Loaded models plus request handling. Holds no per-request state."""

    models: Models
    limits: Limits
    config: EngineConfig | None

    def __init__(self, models: Models, limits: Limits, config: EngineConfig | None = None):
        self.models = models
        self.limits = limits
        self.config = config

    @classmethod
    def setup(
        cls,
        config: EngineConfig,
        placement: Placement | None = None,
        limits: Limits | None = None,
    ) -> Engine:
        """Scan the model folders and load every checkpoint once.

        Request limits default to `Limits.from_env()`: SD_LIMIT_* read here, once.
        """
        limits = Limits.from_env() if limits is None else limits
        # 0. Allocator settings first, so the model weights already follow them.
        if tuned := configure_allocator():
            log.info("setup: glibc allocator %s", tuned)
        # 0a. The device (SD_DEVICE): an unusable CUDA fails here, before any file is read.
        placement = placement or choose_placement()
        log.info("setup: %s", describe(placement))
        # 0b. SD_FETCH_MODELS=1: the manifest's files, downloaded and verified (or setup fails).
        if config.fetch_manifest is not None:
            fetch_from_env(config.models_dir, config.fetch_manifest)
        # 1. What is on disk (hashes cached by path in the models folder, size and probe).
        hashes = HashCache(config.cache_dir / "hashes.json", root=config.models_dir)
        catalog = Catalog.scan(config.models_dir, hash_cache=hashes)
        # 2. The default checkpoint must exist before anything loads.
        default = catalog.default_checkpoint(config.default_checkpoint)
        # 3. Load every checkpoint into the cache; the device holds those that fit
        # SD_DEVICE_MEMORY, the others wait in host memory (engine/working_set.py). Every
        # cache below reports to the same working set (through the placement).
        budget = budget_from_env(placement.device)
        if budget is not None:
            log.info("setup: device budget %s (%s)", gib(budget), BUDGET_ENV)
        working = WorkingSet(
            placement.device, budget, pinned_limit=pinned_limit_from_env(placement.device)
        )
        placement = dataclasses.replace(placement, memory=working)
        cache = PipelineCache(catalog, placement, config.cache_dir, working=working)
        cache.load_all()
        # 3a. Requests in flight at once, and UNet rows per batched step (step_batcher.py).
        free = torch.cuda.mem_get_info()[0] if placement.device == "cuda" else None
        cache.batcher.max_sessions = sessions_from_env(free)
        cache.batcher.max_rows = max_rows_from_env()
        log.info(
            "setup: up to %d requests at once, %d UNet rows per batched step (%s, %s)",
            cache.batcher.max_sessions,
            cache.batcher.max_rows,
            CONCURRENCY_ENV,
            MAX_ROWS_ENV,
        )
        # 4. LoRAs and embeddings: listed and hashed once; LoRA weights load on first use.
        loras = LoraCatalog.scan(catalog.files("loras"), hashes)
        embeddings = EmbeddingCatalog.scan(catalog.files("embeddings"))
        # 5. VAE files: listed and hashed (cached); each loads on first use.
        vaes = VaeCatalog.scan(catalog.files("vae"), cache.placement, config.cache_dir, hashes)
        # 5a. Upscaler files: each read once for its architecture (unusable ones are skipped
        # with their reason in the log); a model loads on first use.
        upscalers = UpscalerCatalog.scan(
            catalog.files("upscalers"),
            reserved=available_hr_upscalers(),
            device=cache.placement.device,
            dtype=cache.placement.dtype,
            memory=working,
        )
        # 6. Extensions (alwayson_scripts): an extension that fails to import fails setup.
        extensions = ExtensionRegistry.discover()
        extensions.setup(catalog, cache.placement)
        models = Models(
            catalog,
            cache,
            default,
            loras=loras,
            embeddings=embeddings,
            vaes=vaes,
            extensions=extensions,
            upscalers=upscalers,
        )
        return cls(models, limits, config)

    def rescanned(self) -> Engine:
        """A new engine over the model folders as they are now (webui's refresh-checkpoints,
        -loras, -vae, -embeddings): unchanged models reused, new ones loaded, removed ones
        dropped. This engine is left as it was, so a request running on it is unaffected."""
        if self.config is None:
            raise ModelLoadError("this engine was not set up from model folders; nothing to rescan")
        cache = self.config.cache_dir / "hashes.json"
        hashes = HashCache(cache, root=self.config.models_dir)
        return Engine(rescan(self.models, hashes), self.limits, self.config)

    def with_default_checkpoint(self, name: str, field: str = "sd_model_checkpoint") -> Engine:
        """A new engine whose requests without a checkpoint get `name` (any webui name);
        an unknown name is a RequestError naming `field`."""
        info = self.models.catalog.resolve_checkpoint(name, field=field)
        return Engine(dataclasses.replace(self.models, default=info), self.limits, self.config)

    def handle(
        self,
        endpoint: str,
        api_json: str,
        progress: Progress = log_progress,
        playground: Mapping[str, Any] | None = None,
    ) -> Response:
        """Serve one request: a listing endpoint, or txt2img/img2img from a webui payload.

        `playground`: values of the typed playground inputs, merged into the payload where
        `api_json` does not set the field (engine/playground.py)."""
        name = str(endpoint).strip().lower()
        if name in LISTINGS:
            return Response(listing=LISTINGS[name](self))
        if name in INSPECTORS:
            return Response(listing=INSPECTORS[name](self, api_json))
        if name in EXTRAS_ENDPOINTS:
            try:
                with self.models.cache.memory.lease():  # its upscaler stays until it ends
                    extras = run_extras(self, name, api_json, (playground or {}).get("init_image"))
            finally:
                release_host_memory()
            return Response(images=extras.images, info=extras.html_info)
        extension_listings = self.models.extensions.listings() if self.models.extensions else {}
        if name in extension_listings:
            return Response(listing=extension_listings[name]())
        if name not in GENERATION_ENDPOINTS:
            choices = [*ENDPOINTS, *extension_listings]
            raise RequestError.single(
                "endpoint", endpoint, f"must be one of {', '.join(map(repr, choices))}"
            )
        return self.generate(self.parse(name, api_json, playground), progress)

    def parse(
        self, endpoint: str, api_json: str, playground: Mapping[str, Any] | None = None
    ) -> ParsedRequest:
        """A txt2img/img2img payload checked and typed (every field and limit), no model work:
        a server can refuse a bad request before it queues it."""
        payload = merge_playground(decode_api_json(api_json, self.limits), playground or {})
        return parse_request(payload, choose_mode(endpoint, payload), self.limits)

    def generate(self, parsed: ParsedRequest, progress: Progress = log_progress) -> Response:
        """Run a parsed txt2img/img2img request; several may run at once from several threads
        (their UNet steps batched together: engine/step_batcher.py)."""
        batcher = self.models.cache.batcher
        try:
            while True:
                try:
                    # What it uses stays on the device until it ends (engine/working_set.py).
                    with self.models.cache.memory.lease(), batcher.session():
                        result: Result = generate(self.models, parsed, self.limits, progress)
                    break
                except DeviceBusy as busy:
                    # Its models fit once a request in flight ends: wait for one, then again
                    # from the start (nothing was returned yet). None in flight: refused.
                    log.info("waiting for a running request to end: %s", busy)
                    if not batcher.wait_for_an_end(timeout=BUSY_WAIT_S):
                        raise
        finally:
            release_host_memory()
        return Response(images=result.images, info=result.info, parameters=result.parameters)
