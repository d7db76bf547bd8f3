"""The pipeline cache: one set of weights per checkpoint, loaded once at setup.

A request never changes a cached pipeline: the sampler loop (sampling.py) reads its modules
(UNet, VAE, text encoders) and brings its own fresh scheduler, so txt2img, img2img and
inpainting all run on the same weights and no scheduler state or call-time attribute can carry
over to the next request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import Catalog, CheckpointInfo
from .loading import LoadedCheckpoint, Placement, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class PipelineCache:
    """Every checkpoint of the catalog, loaded once."""

    catalog: Catalog
    placement: Placement
    cache_root: Path
    loaded: dict[str, LoadedCheckpoint] = field(default_factory=dict)

    def load_all(self) -> None:
        """Load every checkpoint (setup). A file that fails to load fails setup."""
        for info in self.catalog.checkpoints:
            self.loaded[info.title] = load_checkpoint(info, self.placement, self.cache_root)
        log.info("loaded %d checkpoint(s): %s", len(self.loaded), ", ".join(self.loaded))

    def get(self, info: CheckpointInfo) -> LoadedCheckpoint:
        return self.loaded[info.title]
