"""The pipeline cache: one set of weights per checkpoint, loaded once at setup.

Identical components are stored once. Fine-tunes usually carry their base model's VAE byte for
byte, often its text encoders too (an SDXL refiner carries the base's second text encoder), and
"baked VAE" variants differ from their model in the VAE only. So each component a checkpoint
loads (VAE, text encoders, UNet) is compared with the same component of the checkpoints already
loaded, and one whose class, config and every tensor are equal is used in place of the new copy
(which is dropped). The comparison (`same_weights`) is exact: torch.equal tensor by tensor, on
the device the weights sit on, leaving at the first difference. A content digest would read
every byte of every checkpoint through the CPU at setup; a comparison of a real fine-tune stops
at its first tensor, and only an identical component is read whole.

What may differ between checkpoints sharing a module is handled where it is used:
- LoRA adapters live inside the UNet and text-encoder layers (peft). A checkpoint sharing any
  of them with an earlier one gets a `lora_scope` of its own, so its adapters have their own
  names in the shared layers (engine/networks.py): each checkpoint's LoRA results are exactly
  what they are without sharing, and each checkpoint's adapter cache (its pins, its evictions)
  touches its own adapters only. A LoRA used on two such checkpoints is held twice (its
  weights are megabytes, the modules it rides on are gigabytes).
- A VAE and text encoders are only read by requests; a UNet's calls are keyed by the module
  (engine/step_batcher.py), so requests of two checkpoints sharing a UNet may share a call.

A request never changes a cached pipeline: the sampler loop (sampling.py) reads its modules
(UNet, VAE, text encoders) and brings its own fresh scheduler, so txt2img, img2img and
inpainting all run on the same weights and no scheduler state or call-time attribute can carry
over to the next request.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .catalog import Catalog, CheckpointInfo
from .loading import LoadedCheckpoint, Placement, load_checkpoint, placement
from .networks import COMPONENT_WEIGHTS
from .oom import reported
from .step_batcher import StepBatcher
from .working_set import WorkingSet, weight_bytes

log = logging.getLogger(__name__)

# Compared with the earlier checkpoints' at load (cheapest first: a VAE is the likeliest match).
SHARED_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "unet")
LORA_COMPONENTS = tuple(COMPONENT_WEIGHTS)


@dataclass
class PipelineCache:
    """Every checkpoint of the catalog, loaded once."""

    catalog: Catalog
    placement: Placement
    cache_root: Path
    loaded: dict[str, LoadedCheckpoint] = field(default_factory=dict)
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
        """Load one checkpoint into the cache (sharing identical components)."""
        started = time.perf_counter()
        assert self.working is not None
        self.working.before_load(_file_bytes(info.filename))
        with reported(
            f"loading checkpoint {info.title}",
            "use a larger GPU, fewer checkpoints, or SD_DTYPE=float16",
        ):
            loaded = load_checkpoint(info, self.placement, self.cache_root)
        self._share_components(loaded)
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
        hashes) are reused as loaded, the others load now (sharing components with the kept
        ones); this cache is left as it was."""
        fresh = PipelineCache(
            catalog,
            self.placement,
            self.cache_root,
            working=self.working,
            batcher=self.batcher,  # the same modules: the same turns
        )
        assert self.working is not None
        for title in set(self.loaded) - {info.title for info in catalog.checkpoints}:
            self.working.forget(title)
        kept = {
            info.title: self.loaded[info.title]
            for info in catalog.checkpoints
            if info.title in self.loaded and self.loaded[info.title].info == info
        }
        fresh.loaded.update(kept)  # first: new checkpoints may share their modules
        for info in catalog.checkpoints:
            if info.title not in kept:
                fresh.load(info)
        fresh.loaded = {i.title: fresh.loaded[i.title] for i in catalog.checkpoints}
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

    def _share_components(self, loaded: LoadedCheckpoint) -> None:
        """Use an earlier checkpoint's module for every component equal to it, and give
        `loaded` its LoRA scope (see the module docstring)."""
        pipe = loaded.pipe
        for name in SHARED_COMPONENTS:
            module = getattr(pipe, name, None)
            if module is None:
                continue
            same = next(
                (
                    other
                    for earlier in self.loaded.values()
                    if (other := getattr(earlier.pipe, name, None)) is not None
                    and (other is module or same_weights(other, module))
                ),
                None,
            )
            if same is not None and same is not module:
                log.info(
                    "%s: %s identical to an earlier checkpoint's; stored once",
                    loaded.info.title,
                    name,
                )
                setattr(pipe, name, same)
        loaded.lora_scope = self._lora_scope(loaded)

    def _lora_scope(self, loaded: LoadedCheckpoint) -> str:
        mine = lora_modules(loaded)
        if not any(a is b for e in self.loaded.values() for a in mine for b in lora_modules(e)):
            return ""
        # Unique per load, never reused: adapters another checkpoint (or a dropped one) left
        # in a shared module are never taken for this one's, and no checkpoint's cache
        # eviction can delete an adapter another checkpoint's request is using.
        return uuid.uuid4().hex[:8]

    def resident_bytes(self) -> int:
        """Bytes of every cached checkpoint's weights, each tensor counted once."""
        return weight_bytes(*(loaded.pipe for loaded in self.loaded.values()))


def lora_modules(loaded: LoadedCheckpoint) -> list[torch.nn.Module]:
    """The components LoRA adapters are loaded into (engine/networks.py COMPONENT_WEIGHTS)."""
    pipe = loaded.pipe
    return [m for n in LORA_COMPONENTS if (m := getattr(pipe, n, None)) is not None]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules compute the same thing: same class and config, the same tensor
    names, dtypes and shapes, and equal values (exact; leaves at the first difference)."""
    if type(a) is not type(b) or getattr(a, "config", None) != getattr(b, "config", None):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return False
    if any(x.dtype != sb[k].dtype or x.shape != sb[k].shape for k, x in sa.items()):
        return False
    return all(torch.equal(x, sb[k].to(x.device)) for k, x in sa.items())


def _file_bytes(path: Path) -> int:
    """A checkpoint's size on disk (a diffusers folder: its files), the estimate of its
    weights before it loads."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size
