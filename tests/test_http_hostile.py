"""Red-team findings through the real Cog server: prompt syntax that multiplies work, and
install-time files that tried to change a checkpoint or every prompt."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import Engine

from .helpers import SD1, payload, pixels
from .test_http import CogServer, image_bytes, running_server

# The Cog server fixture of test_http, one per module.
from .test_http import server as server

pytestmark = pytest.mark.http

GOLDEN = payload(steps=2, prompt="a lighthouse")


def golden_pixels(server: CogServer) -> bytes:
    prediction = server.predict(GOLDEN)
    assert prediction["status"] == "succeeded", prediction.get("error")
    return pixels(image_bytes(prediction)[0]).tobytes()


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        (payload(prompt="a AND " * 3333, steps=150), "prompt", "SD_LIMIT_MAX_AND_PARTS"),
        (payload(prompt="a BREAK " * 2500, steps=150), "prompt", "SD_LIMIT_MAX_PROMPT_CHUNKS"),
        (
            payload(prompt=" ".join(f"[x{i}:y{i}:{i}]" for i in range(1, 150)), steps=150),
            "prompt",
            "SD_LIMIT_MAX_PROMPT_SCHEDULE",
        ),
        (
            payload(negative_prompt="b BREAK " * 500, steps=150),
            "negative_prompt",
            "SD_LIMIT_MAX_PROMPT_CHUNKS",
        ),
    ],
    ids=["and-parts", "break-chunks", "editing-tags", "negative-breaks"],
)
def test_work_multiplying_prompts_are_refused_and_the_golden_is_unchanged(
    server: CogServer, body: str, field: str, needle: str
) -> None:
    before = golden_pixels(server)
    prediction = server.predict(body)
    assert prediction["status"] == "failed"
    assert needle in prediction["error"] and f"{field}:" in prediction["error"]
    assert golden_pixels(server) == before


@pytest.fixture(scope="module")
def planted_dir(tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SD1 checkpoint with a same-name .yaml that is a symlink to a v-prediction config
    outside the folder, and an embedding whose file name is a single space."""
    root = tmp_path_factory.mktemp("planted")
    outside = tmp_path_factory.mktemp("outside") / "v.yaml"
    outside.write_text('model:\n  params:\n    parameterization: "v"\n')
    models = root / "models"
    for folder in ("checkpoints", "embeddings"):
        (models / folder).mkdir(parents=True)
    shutil.copy(tiny_models_dir / "checkpoints" / SD1, models / "checkpoints" / SD1)
    os.symlink(outside, models / "checkpoints" / (Path(SD1).stem + ".yaml"))
    shutil.copy(
        tiny_models_dir / "embeddings" / "tiny-embedding.safetensors",
        models / "embeddings" / " .safetensors",
    )
    return models


@pytest.fixture(scope="module")
def planted_server(
    planted_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CogServer]:
    log = tmp_path_factory.mktemp("cog-planted") / "server.log"
    with running_server(planted_dir, log) as (server, status):
        assert status == "READY", log.read_text()[-3000:]
        yield server


def test_planted_yaml_symlink_and_blank_embedding_change_nothing(
    planted_server: CogServer, engine: Engine
) -> None:
    # The same checkpoint bytes in the shared tiny folder (no yaml, no blank embedding) are the
    # reference: a v-prediction reading or an embedding injected into every prompt would both
    # change the picture completely.
    served = golden_pixels(planted_server)
    reference = pixels(engine.handle("txt2img", GOLDEN, lambda s, t: None).images[0].data)
    assert served == reference.tobytes()
    listing = planted_server.predict("{}", endpoint="embeddings")
    embeddings = json.loads(listing["output"]["listing"])
    assert " " not in embeddings["loaded"]
    assert " " in embeddings["skipped"]
