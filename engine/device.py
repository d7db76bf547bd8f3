"""Which device and dtype the engine runs on: SD_DEVICE=auto|cuda|cpu and
SD_DTYPE=float32|float16|bfloat16, decided once at setup.

The Cog image sets SD_DEVICE=cuda (cog.yaml): where CUDA is unusable there (a driver too old
for the CUDA 13 build of torch, no GPU attached), setup must fail with a message saying so;
falling back to the CPU would look healthy and then time every prediction out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from .errors import ModelLoadError
from .loading import Placement

log = logging.getLogger(__name__)

DEVICE_ENV = "SD_DEVICE"
DEVICE_CHOICES = ("auto", "cuda", "cpu")
DTYPE_ENV = "SD_DTYPE"
DTYPE_CHOICES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Defaults: fp16 on CUDA; fp32 on CPU (fp16 matmuls on CPU are slow and lossy). SD_DTYPE overrides
# either (the tests run the fp16 path on the CPU: tests/test_dtype_paths.py).
DTYPES: Mapping[str, torch.dtype] = {"cuda": torch.float16, "cpu": torch.float32}


def setup_logging() -> None:
    """INFO logs to stderr, which Cog keeps as the setup log (GET /health-check)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None when a small operation on it works."""
    try:
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                return "this torch build has no CUDA support"
            return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU"
        # is_available() can be True while kernels cannot run (e.g. an unsupported GPU).
        probe = torch.ones(4, device="cuda") * 2
        if float(probe.sum().item()) != 8.0:
            return "a test computation on the GPU gave a wrong result"
    except (RuntimeError, AssertionError) as exc:
        return f"CUDA failed to initialise ({exc})"
    return None


def choose_placement(environ: Mapping[str, str] | None = None) -> Placement:
    """The device and dtype SD_DEVICE asks for (default auto: CUDA when usable, else CPU)."""
    env = os.environ if environ is None else environ
    wanted = (env.get(DEVICE_ENV) or "auto").strip().lower()
    if wanted not in DEVICE_CHOICES:
        raise ModelLoadError(
            f"{DEVICE_ENV}={env.get(DEVICE_ENV)!r} is not a device choice; "
            f"allowed: {', '.join(DEVICE_CHOICES)}"
        )
    problem = None if wanted == "cpu" else cuda_problem()
    if wanted == "cuda" and problem is not None:
        raise ModelLoadError(
            f"{DEVICE_ENV}=cuda but CUDA is unusable: {problem}. Check the GPU and its driver "
            f"(this torch is built for CUDA {torch.version.cuda or 'none'}), or set "
            f"{DEVICE_ENV}=cpu to run on the CPU on purpose."
        )
    device = "cuda" if wanted == "cuda" or (wanted == "auto" and problem is None) else "cpu"
    return Placement(device, choose_dtype(device, env))


def choose_dtype(device: str, environ: Mapping[str, str] | None = None) -> torch.dtype:
    """SD_DTYPE, else the device's default (DTYPES); a bad value fails setup naming the choices."""
    env = os.environ if environ is None else environ
    wanted = (env.get(DTYPE_ENV) or "").strip().lower()
    if not wanted:
        return DTYPES[device]
    if wanted not in DTYPE_CHOICES:
        raise ModelLoadError(
            f"{DTYPE_ENV}={env.get(DTYPE_ENV)!r} is not a dtype choice; "
            f"allowed: {', '.join(DTYPE_CHOICES)}"
        )
    return DTYPE_CHOICES[wanted]


def attention_backend(placement: Placement) -> str:
    """What the attention layers run on (loading.py enables xformers on CUDA when it imports)."""
    if placement.device == "cuda":
        try:
            import xformers  # noqa: F401
        except ImportError:
            return "PyTorch SDPA"
        return "xformers"
    return "PyTorch SDPA"


def describe(placement: Placement) -> str:
    """One line for the setup log: device (with the GPU's name), dtype, attention backend."""
    where = placement.device
    if where == "cuda":
        props = torch.cuda.get_device_properties(0)
        where = f"cuda ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    dtype = str(placement.dtype).removeprefix("torch.")
    return f"device {where}, dtype {dtype}, attention {attention_backend(placement)}"
