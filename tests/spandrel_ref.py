"""spandrel 0.3.4's own architectures (what webui 1.10.1 runs) as the independent reference of
the upscaler tests, imported without spandrel's package __init__ (whose registry imports every
architecture, torchvision among their imports; requirements-dev.txt installs spandrel with
--no-deps). The stand-in package entries are removed again afterwards."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn


def _einops_stand_in() -> dict[str, types.ModuleType]:
    """spandrel's DAT and HAT import einops for three reshapes only; einops is not installed
    here (README "Packages"), so these modules give exactly those and refuse any other
    pattern."""

    def rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
        if pattern == "b c h w -> b (h w) c":
            return x.flatten(2).transpose(1, 2)
        if pattern == "b (h w) c -> b c h w":
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], sizes["h"], sizes["w"])
        if pattern == "b (nc ch owh oww) nw -> nc (b nw) (owh oww) ch":  # HAT's OCAB
            b, _, nw = x.shape
            nc, ch, area = sizes["nc"], sizes["ch"], sizes["owh"] * sizes["oww"]
            return x.view(b, nc, ch, area, nw).permute(1, 0, 4, 3, 2).reshape(nc, b * nw, area, ch)
        raise NotImplementedError(pattern)

    class Rearrange(nn.Module):
        def __init__(self, pattern: str) -> None:
            super().__init__()
            self.pattern = pattern

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return rearrange(x, self.pattern)

    root, layers, torch_layers = (
        types.ModuleType(n) for n in ("einops", "einops.layers", "einops.layers.torch")
    )
    root.rearrange = rearrange  # type: ignore[attr-defined]
    torch_layers.Rearrange = Rearrange  # type: ignore[attr-defined]
    return {"einops": root, "einops.layers": layers, "einops.layers.torch": torch_layers}


def spandrel_arch(name: str) -> Any:
    """spandrel's `<name>Arch()` from `spandrel.architectures.<name>` (e.g. "DAT", "HAT"),
    or a skip when spandrel is not installed."""
    spec = importlib.util.find_spec("spandrel")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("spandrel is not installed (requirements-dev.txt)")
    before = set(sys.modules)
    package = types.ModuleType("spandrel")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["spandrel"] = package
    if importlib.util.find_spec("einops") is None:
        sys.modules.update(_einops_stand_in())
    try:
        module = importlib.import_module(f"spandrel.architectures.{name}")
        return getattr(module, f"{name}Arch")()
    finally:
        for entry in set(sys.modules) - before:
            if entry.split(".")[0] in ("spandrel", "einops"):
                sys.modules.pop(entry)
