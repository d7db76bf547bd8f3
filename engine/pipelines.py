"""The pipeline cache: one set of weights per checkpoint, loaded once at setup.

Identical VAEs are stored once: fine-tunes usually carry their base model's VAE byte for byte,
so each checkpoint's VAE gets a content digest at load and a checkpoint whose VAE matches an
earlier one's uses that module (its own copy is dropped). A VAE is only read by requests
(never patched: LoRAs and ControlNets touch the UNet and text encoders), so sharing it changes
no picture. Text encoders are not shared: LoRA adapters are injected into them per checkpoint.

A request never changes a cached pipeline: the sampler loop (sampling.py) reads its modules
(UNet, VAE, text encoders) and brings its own fresh scheduler, so txt2img, img2img and
inpainting all run on the same weights and no scheduler state or call-time attribute can carry
over to the next request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .catalog import Catalog, CheckpointInfo
from .loading import LoadedCheckpoint, Placement, load_checkpoint, placement
from .oom import reported
from .step_batcher import StepBatcher
from .working_set import WorkingSet, weight_bytes

log = logging.getLogger(__name__)


@dataclass
class PipelineCache:
    """Every checkpoint of the catalog, loaded once."""

    catalog: Catalog
    placement: Placement
    cache_root: Path
    loaded: dict[str, LoadedCheckpoint] = field(default_factory=dict)
    _vaes: dict[str, Any] = field(default_factory=dict)  # content digest -> the shared module
    # Which checkpoints sit on the device (engine/working_set.py); default: no budget.
    working: WorkingSet | None = None
    # Turns and batched UNet calls of the requests in flight on these modules.
    batcher: StepBatcher = field(default_factory=StepBatcher)

    def __post_init__(self) -> None:
        if self.working is None:
            self.working = WorkingSet(self.placement.device, None)

    def load_all(self) -> None:
        """Load every checkpoint (setup). A file that fails to load fails setup."""
        for info in self.catalog.checkpoints:
            self.load(info)
        log.info("loaded %d checkpoint(s): %s", len(self.loaded), ", ".join(self.loaded))

    def load(self, info: CheckpointInfo) -> None:
        """Load one checkpoint into the cache (sharing an identical VAE)."""
        started = time.perf_counter()
        assert self.working is not None
        self.working.before_load(_file_bytes(info.filename))
        with reported(
            f"loading checkpoint {info.title}",
            "use a larger GPU, fewer checkpoints, or SD_DTYPE=float16",
        ):
            loaded = load_checkpoint(info, self.placement, self.cache_root)
        self._share_vae(loaded)
        placement(loaded)  # the device it runs on, read while it is there
        self.loaded[info.title] = loaded
        self.working.admit(info.title, loaded.pipe)
        on_gpu = ""
        if self.placement.device == "cuda":
            on_gpu = f"; CUDA memory allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB"
        log.info(
            "loaded %s in %.2f s (%.1f MiB of weights on %s%s)",
            info.title,
            time.perf_counter() - started,
            weight_bytes(loaded.pipe) / 2**20,
            self.placement.device,
            on_gpu,
        )

    def rescanned(self, catalog: Catalog) -> PipelineCache:
        """A cache for a rescanned `catalog`: unchanged checkpoints (same title, file and
        hashes) are reused as loaded, the others load now; this cache is left as it was."""
        fresh = PipelineCache(
            catalog,
            self.placement,
            self.cache_root,
            _vaes=dict(self._vaes),
            working=self.working,
            batcher=self.batcher,  # the same modules: the same turns
        )
        assert self.working is not None
        for title in set(self.loaded) - {info.title for info in catalog.checkpoints}:
            self.working.forget(title)
        for info in catalog.checkpoints:
            kept = self.loaded.get(info.title)
            if kept is not None and kept.info == info:
                fresh.loaded[info.title] = kept
            else:
                fresh.load(info)
        return fresh

    @property
    def memory(self) -> WorkingSet:
        """The device working set (engine/working_set.py) every cache reports to."""
        assert self.working is not None
        return self.working

    def get(self, info: CheckpointInfo) -> LoadedCheckpoint:
        return self.loaded[info.title]

    def acquire(self, checkpoints: Sequence[LoadedCheckpoint]) -> None:
        """Put these checkpoints (one request's) on the device within the budget."""
        assert self.working is not None
        self.working.acquire([c.info.title for c in checkpoints])

    def _share_vae(self, loaded: LoadedCheckpoint) -> None:
        digest = module_digest(loaded.pipe.vae)
        shared = self._vaes.setdefault(digest, loaded.pipe.vae)
        if shared is not loaded.pipe.vae:
            log.info("%s: VAE identical to an earlier checkpoint's; stored once", loaded.info.title)
            loaded.pipe.vae = shared

    def resident_bytes(self) -> int:
        """Bytes of every cached checkpoint's weights, each tensor counted once."""
        return weight_bytes(*(loaded.pipe for loaded in self.loaded.values()))


def module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, dtypes, shapes, bytes) in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def _file_bytes(path: Path) -> int:
    """A checkpoint's size on disk (a diffusers folder: its files), the estimate of its
    weights before it loads."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
