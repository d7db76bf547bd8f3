"""SD_DEVICE: auto|cuda|cpu; a Cog image that asks for CUDA and cannot use it fails setup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.device import choose_placement, cuda_problem, describe
from engine.errors import ModelLoadError

from .test_http import running_server

CUDA = cuda_problem() is None


def test_cpu_on_request() -> None:
    placement = choose_placement({"SD_DEVICE": "cpu"})
    assert (placement.device, placement.dtype) == ("cpu", torch.float32)
    assert describe(placement) == "device cpu, dtype float32, attention PyTorch SDPA"


@pytest.mark.parametrize(
    ("value", "dtype"),
    [("float16", torch.float16), (" BFloat16 ", torch.bfloat16), ("float32", torch.float32)],
)
def test_sd_dtype_is_honoured_on_the_cpu_and_logged(value: str, dtype: torch.dtype) -> None:
    placement = choose_placement({"SD_DEVICE": "cpu", "SD_DTYPE": value})
    assert placement.dtype == dtype
    assert f"dtype {str(dtype).removeprefix('torch.')}," in describe(placement)


def test_unknown_dtype_names_the_variable_and_the_choices() -> None:
    with pytest.raises(
        ModelLoadError, match=r"SD_DTYPE='fp8'.*allowed: float32, float16, bfloat16"
    ):
        choose_placement({"SD_DEVICE": "cpu", "SD_DTYPE": "fp8"})


def test_auto_takes_cuda_only_when_usable() -> None:
    for env in ({}, {"SD_DEVICE": "auto"}, {"SD_DEVICE": " AUTO "}):
        assert choose_placement(env).device == ("cuda" if CUDA else "cpu")


def test_unknown_device_names_the_variable_and_the_choices() -> None:
    with pytest.raises(ModelLoadError, match=r"SD_DEVICE='tpu'.*allowed: auto, cuda, cpu"):
        choose_placement({"SD_DEVICE": "tpu"})


def test_cuda_requested_where_it_is_unusable_fails_clearly() -> None:
    if CUDA:
        assert choose_placement({"SD_DEVICE": "cuda"}).dtype == torch.float16
        return
    with pytest.raises(
        ModelLoadError, match=r"SD_DEVICE=cuda but CUDA is unusable: .*SD_DEVICE=cpu"
    ):
        choose_placement({"SD_DEVICE": "cuda"})


@pytest.mark.http
def test_cog_server_setup_fails_when_cuda_is_asked_for_and_unusable(
    tiny_models_dir: Path, tmp_path: Path
) -> None:
    if CUDA:
        pytest.skip("CUDA is usable here: nothing to refuse")
    with running_server(tiny_models_dir, tmp_path / "log", {"SD_DEVICE": "cuda"}) as (
        server,
        status,
    ):
        assert status == "SETUP_FAILED"
        _, health = server.call("GET", "/health-check")
        assert "SD_DEVICE=cuda but CUDA is unusable" in json.dumps(health)
        # It failed before reading any checkpoint (nothing was hashed or loaded).
        assert "loaded tiny" not in json.dumps(health)
