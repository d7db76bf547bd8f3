"""ControlNet model files: webui's names, its lookup, and offline loading through diffusers.

Files are the original single-file layout (`control_model.*` keys, as lllyasviel's ControlNet
1.0/1.1 files and the *_fp16 prunes). They load with diffusers' `ControlNetModel.from_single_file`
and a local config built from the family's reference UNet config in engine/configs, with the
widths the tensor shapes decide (the same inference engine/loading.py does for UNets).
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.catalog import OLDHASH_END, OLDHASH_START
from engine.errors import ModelLoadError, UnknownName
from engine.loading import (
    CONFIG_ROOT,
    FAMILIES,
    UNET,
    Family,
    Placement,
    Shapes,
    infer_unet,
    read_shapes,
)
from engine.oom import is_out_of_memory, reported
from engine.working_set import module_entry

CONTROL = "control_model."
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]$")


def old_hash(path: Path) -> str:
    """webui's legacy model hash: sha256 of the 64 KiB at 1 MiB (what ControlNet lists)."""
    import hashlib

    with open(path, "rb") as fh:
        fh.seek(OLDHASH_START)
        return hashlib.sha256(fh.read(OLDHASH_END - OLDHASH_START)).hexdigest()[:8]


@dataclass(frozen=True)
class ControlNetFile:
    path: Path
    name: str  # basename without extension
    oldhash: str

    @property
    def title(self) -> str:
        """As webui lists it: `"<basename> [<old hash>]"`."""
        return f"{self.name} [{self.oldhash}]"


def scan(files: tuple[Path, ...]) -> tuple[ControlNetFile, ...]:
    """One entry per file, in catalog order."""
    return tuple(ControlNetFile(p, p.stem, old_hash(p)) for p in files)


def find_model(models: tuple[ControlNetFile, ...], value: Any, *, field: str) -> ControlNetFile:
    """Mikubill's `find_closest_lora_model_name`: the exact title, else the lowercase basename,
    else the shortest basename containing the text. We also strip a " [hash]" that names a
    stale hash before giving up (webui would fail there)."""
    text = str(value).strip()
    by_title = {m.title: m for m in models}
    by_name = {m.name.lower(): m for m in models}
    for candidate in (text, _HASH_SUFFIX.sub("", text)):
        if not candidate:
            continue
        if candidate in by_title:
            return by_title[candidate]
        low = candidate.lower()
        if low in by_name:
            return by_name[low]
        containing = sorted((n for n in by_name if low in n), key=len)
        if containing:
            return by_name[containing[0]]
    raise UnknownName(field, value, [m.title for m in models], kind="ControlNet model")


# --------------------------------------------------------------------------------------------
# Config inference


# diffusers name -> original name, for the SDXL ControlNet's label embedding.
_LABEL_EMBEDDING = (
    ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("add_embedding.linear_1.bias", "label_emb.0.0.bias"),
    ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
    ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
)


def read_state_dict(path: Path) -> dict[str, Any]:
    """Tensors of a ControlNet file (pickles only through torch's weights-only loader)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return dict(state)


def _family(shapes: Shapes) -> Family:
    """SDXL ControlNets have the label embedding (ADM); SD2 ones linear proj_in, SD1 conv."""
    if f"{CONTROL}label_emb.0.0.weight" in shapes:
        return Family.SDXL
    proj_in = next(
        (v for k, v in shapes.items() if k.startswith(CONTROL) and k.endswith(".proj_in.weight")),
        None,
    )
    if proj_in is not None and len(proj_in) == 2:
        return Family.SD2
    return Family.SD1


def infer_config(shapes: Shapes, name: str) -> tuple[Family, dict[str, Any]]:
    """The family and the diffusers ControlNetModel config of an original-layout file."""
    import inspect

    from diffusers import ControlNetModel

    if f"{CONTROL}input_hint_block.0.weight" not in shapes:
        raise ModelLoadError(
            f"{name}: not a ControlNet in the original layout (no control_model.input_hint_block)"
        )
    family = _family(shapes)
    spec = next(s for s in FAMILIES if s.family is family)
    # The encoder half has the UNet's key layout under another prefix; infer_unet also wants
    # the output conv, which a ControlNet lacks: in = out channels for the config's sake.
    as_unet = {UNET + k[len(CONTROL) :]: v for k, v in shapes.items() if k.startswith(CONTROL)}
    in_channels = as_unet[f"{UNET}input_blocks.0.0.weight"][1]
    as_unet[f"{UNET}out.2.weight"] = (in_channels, 1, 3, 3)
    base = json.loads((CONFIG_ROOT / family.value / "unet" / "config.json").read_text("utf-8"))
    unet_cfg = infer_unet(base, as_unet, spec, name)
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in unet_cfg.items() if k in accepted}
    config["_class_name"] = "ControlNetModel"
    config["conditioning_channels"] = shapes[f"{CONTROL}input_hint_block.0.weight"][1]
    hint_convs = sorted(
        int(m.group(1))
        for k in shapes
        if (m := re.match(re.escape(CONTROL) + r"input_hint_block\.(\d+)\.weight$", k))
    )
    # cldm's hint block: conv(c, w0), then pairs conv(w_i, w_i), conv(w_i, w_i+1), then a zero
    # conv to the model width; diffusers lists the widths w_0..w_n.
    widths = [shapes[f"{CONTROL}input_hint_block.{i}.weight"][0] for i in hint_convs[:-1]]
    config["conditioning_embedding_out_channels"] = widths[0::2]
    return family, config


# --------------------------------------------------------------------------------------------
# Loading (once per file; the loaded model is never modified)


@dataclass(frozen=True)
class LoadedControlNet:
    file: ControlNetFile
    family: Family
    model: Any  # diffusers ControlNetModel
    cross_attention_dim: int


class ModelCache:
    """Loaded ControlNets by path: loaded on first use, kept; under SD_DEVICE_MEMORY an idle
    one waits in host memory (engine/working_set.py)."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self._loaded: dict[Path, LoadedControlNet] = {}
        self._lock = threading.Lock()

    def get(self, file: ControlNetFile, beside: str | None = None) -> LoadedControlNet:
        """The loaded ControlNet of `file`, on the device for this request with the checkpoint
        titled `beside` (which making room for it never moves out)."""
        memory = self.placement.memory
        with_checkpoint = [beside] if beside is not None else []
        with self._lock:
            if file.path not in self._loaded:
                if memory is not None:
                    memory.before_load(file.path.stat().st_size, beside=with_checkpoint)
                with reported(f"loading ControlNet {file.title}", "try fewer ControlNet units"):
                    self._loaded[file.path] = self._load(file)
            loaded = self._loaded[file.path]
            if memory is not None:  # on the device for this request
                memory.use(module_entry("controlnet", file.title, loaded.model), with_checkpoint)
            return loaded

    def _load(self, file: ControlNetFile) -> LoadedControlNet:
        """diffusers' own converter for the original layout, then a strict load into a model
        built without initialising its weights. diffusers' converter does not map SDXL's
        label_emb (the size / pooled-text embedding) for ControlNets, so that is added here;
        from_single_file would leave those weights on the meta device."""
        from accelerate import init_empty_weights
        from diffusers import ControlNetModel
        from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

        shapes = read_shapes(file.path)
        family, config = infer_config(shapes, file.title)
        try:
            state = read_state_dict(file.path)
            converted = convert_controlnet_checkpoint(state, config)
            for ours, theirs in _LABEL_EMBEDDING:
                if CONTROL + theirs in state:
                    converted[ours] = state[CONTROL + theirs]
            with init_empty_weights():
                model = ControlNetModel.from_config(
                    {k: v for k, v in config.items() if not k.startswith("_")}
                )
            model.load_state_dict(converted, strict=True, assign=True)
            model.to(dtype=self.placement.dtype)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise  # reported by get() (engine/oom.py), not blamed on the file
            raise ModelLoadError(
                f"{file.title}: loading failed ({type(exc).__name__}: {exc})"
            ) from exc
        for pname, param in model.named_parameters():
            if param.device.type == "meta":
                raise ModelLoadError(f"{file.title}: weight {pname} is missing from the file")
        model.to(self.placement.device)
        model.eval()
        model.requires_grad_(False)
        return LoadedControlNet(file, family, model, int(config["cross_attention_dim"]))
