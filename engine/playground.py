"""The typed inputs of Replicate's playground, merged into a webui payload.

A person fills in prompt, size, steps, ... in the playground; an API client sends `api_json`.
Both end up as one webui payload: each playground value goes where webui's API expects it
(`checkpoint` -> `override_settings.sd_model_checkpoint`, `init_image` -> `init_images[0]`, ...)
unless `api_json` already sets that field, because an API client's payload must mean exactly
what it means to webui. A playground input left at its default changes nothing, so the defaults
below are webui's API defaults (tests/test_deploy_playground.py checks them against the engine).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RequestError
from .inputs import IMAGE_LIMITS


def _image_file(field: str) -> Callable[[Any], str]:
    """A file Cog downloaded for us -> the raw base64 webui's API takes (size capped first)."""

    def convert(value: Any) -> str:
        path = Path(value)
        size = path.stat().st_size
        if size > IMAGE_LIMITS.max_bytes:
            raise RequestError.single(
                field,
                f"{path.name} ({size} bytes)",
                f"must be an image file of at most {IMAGE_LIMITS.max_bytes} bytes",
            )
        return base64.b64encode(path.read_bytes()).decode("ascii")

    return convert


def _as_list(field: str) -> Callable[[Any], list[str]]:
    to_base64 = _image_file(field)
    return lambda value: [to_base64(value)]


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class PlaygroundField:
    """One playground input: its default (= webui's API default: no change) and where its
    value goes in the payload (a path of keys)."""

    name: str
    default: Any
    target: tuple[str, ...]
    convert: Callable[[Any], Any] = _same
    # Other top-level payload keys that set the same thing (webui reads either).
    also: tuple[str, ...] = ()


_OVERRIDE = "override_settings"

# Input name, default, payload path. Order = the playground's order after api_json/endpoint.
FIELDS: tuple[PlaygroundField, ...] = (
    PlaygroundField("prompt", "", ("prompt",)),
    PlaygroundField("negative_prompt", "", ("negative_prompt",)),
    PlaygroundField("checkpoint", "", (_OVERRIDE, "sd_model_checkpoint")),
    PlaygroundField("sampler", "Euler", ("sampler_name",), also=("sampler_index",)),
    PlaygroundField("scheduler", "Automatic", ("scheduler",)),
    PlaygroundField("width", 512, ("width",)),
    PlaygroundField("height", 512, ("height",)),
    PlaygroundField("steps", 50, ("steps",)),
    PlaygroundField("cfg_scale", 7.0, ("cfg_scale",)),
    PlaygroundField("seed", -1, ("seed",)),
    PlaygroundField("batch_size", 1, ("batch_size",)),
    PlaygroundField("init_image", None, ("init_images",), _as_list("init_image")),
    PlaygroundField("mask", None, ("mask",), _image_file("mask")),
    PlaygroundField("denoising_strength", 0.75, ("denoising_strength",)),
    PlaygroundField("enable_hr", False, ("enable_hr",)),
    PlaygroundField("hr_scale", 2.0, ("hr_scale",)),
    PlaygroundField("output_format", "png", (_OVERRIDE, "samples_format")),
    PlaygroundField("output_quality", 80, (_OVERRIDE, "jpeg_quality")),
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)


def merge_playground(payload: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """`payload` with every playground value that differs from its default filled in where
    the payload does not set that field itself (api_json wins). `payload` is not changed."""
    merged = dict(payload)
    for spec in FIELDS:
        value = values.get(spec.name, spec.default)
        if value is None or value == spec.default:
            continue
        if any(merged.get(key) is not None for key in spec.also):
            continue
        *parents, leaf = spec.target
        holder = merged
        for key in parents:
            inner = holder.get(key)
            if inner is None:
                inner = {}
            elif not isinstance(inner, Mapping):
                break  # the payload's own value is wrong: the request parser reports it
            holder[key] = inner = dict(inner)
            holder = inner
        else:
            if holder.get(leaf) is None:
                holder[leaf] = spec.convert(value)
    return merged
