"""The pipeline cache: one set of weights per checkpoint, loaded once at setup.

A request never changes a cached pipeline. It gets a throwaway pipeline object built with
`from_pipe`, which shares the cached modules (UNet, VAE, text encoders) but holds the request's
own fresh scheduler, so no scheduler state, guidance setting or call-time attribute can carry
over to the next request. The txt2img, img2img and inpainting variants are all built this way
from the same weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog, CheckpointInfo
from .loading import Family, LoadedCheckpoint, Placement, load_checkpoint

log = logging.getLogger(__name__)

# Which diffusers class runs each task for each family (img2img/inpaint are used by later issues).
TASK_PIPELINES: Mapping[tuple[Family, str], str] = {
    (Family.SD1, "txt2img"): "StableDiffusionPipeline",
    (Family.SD2, "txt2img"): "StableDiffusionPipeline",
    (Family.SDXL, "txt2img"): "StableDiffusionXLPipeline",
    (Family.SD1, "img2img"): "StableDiffusionImg2ImgPipeline",
    (Family.SD2, "img2img"): "StableDiffusionImg2ImgPipeline",
    (Family.SDXL, "img2img"): "StableDiffusionXLImg2ImgPipeline",
    (Family.SD1, "inpaint"): "StableDiffusionInpaintPipeline",
    (Family.SD2, "inpaint"): "StableDiffusionInpaintPipeline",
    (Family.SDXL, "inpaint"): "StableDiffusionXLInpaintPipeline",
}


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


def task_pipeline(loaded: LoadedCheckpoint, task: str, scheduler: Any) -> Any:
    """A per-request pipeline object over the cached weights, with its own scheduler."""
    import diffusers

    cls = getattr(diffusers, TASK_PIPELINES[(loaded.family, task)])
    with warnings.catch_warnings():
        # The pipeline constructor warns (FutureWarning) when steps_offset != 1; webui's
        # "linspace" schedules need steps_offset 0 on purpose (samplers.py), so it is noise.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = cls.from_pipe(loaded.pipe, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
