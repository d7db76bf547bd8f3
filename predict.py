"""Cog adapter: a webui API payload in, images and webui's `info` out.

All the work happens in `engine/`; this file only maps Cog inputs and outputs onto it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile

from cog import BaseModel, BasePredictor, Input, Path

from engine.api import ENDPOINTS, Engine, EngineConfig

KEEP_OUTPUT_DIRS = 2


class Output(BaseModel):
    """`images`: the generated files (PNG with the infotext in its `parameters` chunk unless
    `samples_format` asks otherwise). `info`: webui's info JSON string. `parameters`: the
    request with defaults filled, as JSON. `listing`: the JSON of a listing endpoint."""

    images: list[Path]
    info: str
    parameters: str
    listing: str


def print_progress(step: int, total: int) -> None:
    # stdout is the prediction log in Cog.
    print(f"step {step}/{total}", flush=True)


class Predictor(BasePredictor):
    def setup(self) -> None:
        """Load every checkpoint under SD_MODELS_DIR (default: this repository)."""
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.engine = Engine.setup(EngineConfig.from_env())
        self.outdirs: list[Path] = []

    def predict(
        self,
        api_json: str = Input(
            description="The webui API payload (body of /sdapi/v1/txt2img or /img2img) as JSON "
            "text, or a data: URL of it (what `cog predict -i api_json=@payload.json` sends).",
            default="{}",
        ),
        endpoint: str = Input(
            description="auto (img2img when init_images is present, else txt2img), txt2img, "
            "img2img, or a listing endpoint named like webui's: "
            + ", ".join(ENDPOINTS[3:])
            + ", and the extensions' (controlnet/model_list, controlnet/module_list, ...).",
            default="auto",
        ),
    ) -> Output:
        response = self.engine.handle(endpoint, api_json, print_progress)
        # Each prediction writes into its own folder; older ones have been delivered by now,
        # so only the last few are kept (a name is never reused while Cog may still read it).
        outdir = Path(tempfile.mkdtemp(prefix="sd-out-"))
        self.outdirs.append(outdir)
        while len(self.outdirs) > KEEP_OUTPUT_DIRS:
            shutil.rmtree(self.outdirs.pop(0), ignore_errors=True)
        files = []
        for index, image in enumerate(response.images):
            path = outdir / f"{index:05d}.{image.extension}"
            path.write_bytes(image.data)
            files.append(Path(path))
        listing = "" if response.listing is None else json.dumps(response.listing)
        return Output(
            images=files,
            info=response.info,
            parameters=json.dumps(response.parameters) if response.parameters else "",
            listing=listing,
        )
