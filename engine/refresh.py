"""Rescanning the model folders while serving (webui's refresh-checkpoints, refresh-loras,
refresh-vae and refresh-embeddings), for the local webui server (sdapi/).

The result is a new `Models` value; the caller swaps it in between requests, so a request in
flight keeps the models it started with. Whatever did not change is reused as it is (a loaded
checkpoint, a LoRA adapter cache, a loaded VAE file); new files load now, removed ones are
dropped (their LoRA adapters leave the modules they share with kept checkpoints). A file
that fails to load fails the refresh and leaves the old models serving.
"""

from __future__ import annotations

import dataclasses
import logging

from .catalog import Catalog, CheckpointInfo, HashCache
from .embeddings import EmbeddingCatalog
from .networks import LoraCatalog, LoraManager
from .pipelines import PipelineCache, lora_modules
from .planning import Models
from .vae import VaeCatalog

log = logging.getLogger(__name__)


def rescan(models: Models, hashes: HashCache) -> Models:
    """The model folders as they are now, reusing every unchanged loaded component.

    The default checkpoint stays while its file does; when it is gone the default falls back
    to the first checkpoint by name (and the log says so)."""
    old = models.catalog
    # 1. What is on disk now (hashes cached by path, size and mtime).
    catalog = Catalog.scan(old.models_dir, hash_cache=hashes)
    # 2. The default checkpoint, before anything loads.
    default = _default(catalog, models.default)
    # 3. Checkpoints: unchanged ones kept as loaded, new or changed ones loaded now.
    cache = models.cache.rescanned(catalog)
    # 4. LoRAs: a new listing; each checkpoint's adapter cache stays (adapters are keyed by
    # file content, so a changed file is a new adapter) and reads the new listing.
    loras = LoraCatalog.scan(catalog.files("loras"), hashes)
    # A reloaded checkpoint is a new UNet: its old adapter cache goes with the old one.
    managers = {t: m for t, m in models.lora_managers.items() if cache.loaded.get(t) is m.loaded}
    for manager in managers.values():
        manager.catalog = loras
    _retire_dropped([m for t, m in models.lora_managers.items() if t not in managers], cache)
    # 5. VAE files and embeddings: new listings; a loaded VAE file is kept while unchanged.
    vaes = models.vaes
    if vaes is not None:
        vaes = VaeCatalog.scan(catalog.files("vae"), vaes.placement, vaes.cache_root, hashes)
        assert models.vaes is not None
        vaes.keep_loaded(models.vaes)
    embeddings = EmbeddingCatalog.scan(catalog.files("embeddings"))
    log.info(
        "refresh: %d checkpoint(s), %d LoRA(s), %d VAE file(s), %d embedding(s)",
        len(catalog.checkpoints),
        len(loras.loras),
        0 if vaes is None else len(vaes.files),
        len(embeddings.items),
    )
    return dataclasses.replace(
        models,
        catalog=catalog,
        cache=cache,
        default=default,
        loras=loras,
        embeddings=embeddings,
        vaes=vaes,
        lora_managers=managers,
    )


def _retire_dropped(dropped: list[LoraManager], cache: PipelineCache) -> None:
    """Adapters of dropped checkpoints leave the modules they share with kept ones.

    Under a turn of the engine's step batcher (shared by the kept engine), so that no other
    request's UNet call runs through the layers meanwhile; a request in flight that still
    uses such an adapter keeps it until it ends (LoraManager.retire)."""
    kept = {id(m) for lc in cache.loaded.values() for m in lora_modules(lc)}
    sharing = [m for m in dropped if any(id(x) in kept for x in lora_modules(m.loaded))]
    if not sharing:
        return
    with cache.batcher.session():
        for manager in sharing:
            manager.retire()
            log.info("refresh: LoRA adapters of dropped %s removed", manager.loaded.info.title)


def _default(catalog: Catalog, current: CheckpointInfo) -> CheckpointInfo:
    if current in catalog.checkpoints:
        return current
    fallback = catalog.default_checkpoint(None)
    log.warning("refresh: default checkpoint %s is gone; now %s", current.title, fallback.title)
    return fallback
