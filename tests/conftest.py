"""Shared fixtures: the tiny models are made once per test run, the engine is loaded once."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests never reach a hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.api import Engine, EngineConfig
from scripts.make_tiny_models import make_all

from .cog_server import CogServer, running_server


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight models in the predictor's folder layout."""
    folder = tmp_path_factory.mktemp("models")
    make_all(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def engine(tiny_models_dir: Path) -> Engine:
    """One engine with every tiny checkpoint loaded, shared by the end-to-end tests."""
    config = EngineConfig(models_dir=tiny_models_dir, cache_dir=tiny_models_dir / ".cache")
    return Engine.setup(config)


@pytest.fixture(scope="session")
def cog_server(
    tiny_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CogServer]:
    """One real Cog server over the tiny models for every HTTP test module (setup once: the
    hostile-input modules then also check that earlier modules left the worker sound)."""
    log = tmp_path_factory.mktemp("cog") / "server.log"
    with running_server(tiny_models_dir, log) as (server, status):
        if status != "READY":
            pytest.fail(f"Cog server did not become READY ({status}):\n{log.read_text()[-4000:]}")
        yield server
