"""ControlNet units as clients send them (Mikubill's `ControlNetUnit`, and Forge's variants).

Every problem of every unit is collected and raised together, with paths like
`alwayson_scripts.controlnet.args[0].model`. Unknown keys are ignored, as pydantic does there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from PIL import Image

from engine.errors import Problem, RequestError
from engine.inputs import decode_image, decode_mask

from .models import ControlNetFile, find_model
from .preprocessors import (
    NEEDS_WEIGHTS,
    PREPROCESSORS,
    Preprocessor,
    find_preprocessor,
    working_size_problem,
)

# webui's control_net_unit_count default. webui drops units past it silently; we refuse an
# enabled one (a silently ignored control is worse than an error).
MAX_UNITS: Final = 3

RESIZE_MODES: Final = ("Just Resize", "Crop and Resize", "Resize and Fill")
_RESIZE_BY_NAME: Final[Mapping[str, int]] = MappingProxyType(
    {
        "just resize": 0,
        "crop and resize": 1,
        "resize and fill": 2,
        # Labels of older releases (Mikubill resize_mode_aliases).
        "inner fit (scale to fit)": 1,
        "scale to fit (inner fit)": 1,
        "outer fit (shrink to fit)": 2,
        "envelope (outer fit)": 2,
    }
)
CONTROL_MODES: Final = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS: Final = ("Both", "Low res only", "High res only")

# Legacy and Forge field names -> Mikubill's.
_ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "input_image": "image",
        "mask_image": "mask",
        "lowvram": "low_vram",
        "guidance": "guidance_end",
    }
)


@dataclass(frozen=True)
class Unit:
    """One enabled, validated unit."""

    index: int  # position in args (the N of the "ControlNet N" infotext key)
    field: str
    module: Preprocessor
    model: ControlNetFile | None  # None for model-free modules (the reference ones)
    image: Image.Image | None
    mask: Image.Image | None
    weight: float = 1.0
    resize_mode: int = 1  # index into RESIZE_MODES
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: int = 0  # index into CONTROL_MODES
    hr_option: str = "Both"
    save_detected_map: bool = True
    ignored_model: str | None = None  # a model named for a model-free module (not used)

    @property
    def model_title(self) -> str:
        """The infotext's "Model" (the extension's default "None" for model-free units)."""
        return "None" if self.model is None else self.model.title


class _Reader:
    """Reads one unit dict, collecting problems instead of stopping at the first."""

    def __init__(self, raw: Mapping[str, Any], field: str):
        self.raw = {_ALIASES.get(k, k): v for k, v in raw.items() if k in _ALIASES}
        self.raw.update({k: v for k, v in raw.items() if k not in _ALIASES})
        self.field = field
        self.problems: list[Problem] = []

    def fail(self, key: str, value: Any, allowed: str) -> None:
        self.problems.append(Problem(f"{self.field}.{key}", value, allowed))

    def get(self, key: str, default: Any, convert: Callable[[Any], Any], allowed: str) -> Any:
        value = self.raw.get(key)
        if value is None:
            return default
        try:
            return convert(value)
        except (TypeError, ValueError, OverflowError):  # float(10**400) overflows
            self.fail(key, value, allowed)
            return default

    def number(
        self, key: str, default: float, lo: float | None = None, hi: float | None = None
    ) -> float:
        allowed = "expected a finite number" + (f" from {lo} to {hi}" if lo is not None else "")

        def convert(v: Any) -> float:
            # float() takes "nan" and "inf", and NaN passes every comparison: refuse them
            # here, or a NaN weight or guidance_start would slip through silently.
            if isinstance(v, bool):
                raise TypeError
            x = float(v)
            if not math.isfinite(x):
                raise ValueError
            if (lo is not None and x < lo) or (hi is not None and x > hi):
                raise ValueError
            return x

        return float(self.get(key, default, convert, allowed))

    def flag(self, key: str, default: bool) -> bool:
        def convert(v: Any) -> bool:
            if isinstance(v, bool):
                return v
            if isinstance(v, int) and v in (0, 1):
                return bool(v)
            if isinstance(v, str) and v.lower() in ("true", "false"):
                return v.lower() == "true"
            raise TypeError

        return bool(self.get(key, default, convert, "expected true or false"))

    def choice(
        self,
        key: str,
        default: int,
        names: Mapping[str, int],
        ints: Mapping[int, int],
        labels: tuple[str, ...],
    ) -> int:
        allowed = (
            f"allowed: {', '.join(map(repr, labels))} (or {', '.join(map(str, sorted(ints)))})"
        )

        def convert(v: Any) -> int:
            if isinstance(v, bool):
                raise TypeError
            if isinstance(v, int):
                return ints[v] if v in ints else _raise()
            if isinstance(v, str):
                text = v.strip().lower()
                if text.isdigit() and int(text) in ints:
                    return ints[int(text)]
                return names[text] if text in names else _raise()
            raise TypeError

        return int(self.get(key, default, convert, allowed))


def _raise() -> int:
    raise ValueError


def _absent(value: Any) -> Any:
    # webuiapi sends `"image": ""` for a unit without an image; null and "" both mean none.
    return None if isinstance(value, str) and not value.strip() else value


def split_image(value: Any) -> tuple[Any, Any]:
    """(image, mask) from every accepted form: b64 str, {"image", "mask"}, [image, mask],
    [{"image", "mask"}, ...] (a batch: the first entry is used). "" counts as no image."""
    value = _absent(value)
    if isinstance(value, Mapping):
        return _absent(value.get("image")), _absent(value.get("mask"))
    if isinstance(value, list | tuple):
        if not value:
            return None, None
        if isinstance(value[0], Mapping):
            return split_image(value[0])
        return _absent(value[0]), _absent(value[1]) if len(value) > 1 else None
    return value, None


def _module(reader: _Reader) -> Preprocessor | None:
    value = reader.raw.get("module", "none")
    value = "none" if value is None else value
    if not isinstance(value, str):
        reader.fail("module", value, "expected a preprocessor name")
        return None
    found = find_preprocessor(value)
    if found is None:
        available = ", ".join(map(repr, PREPROCESSORS))
        if value.strip().lower() in NEEDS_WEIGHTS:
            reader.fail(
                "module",
                value,
                f"this preprocessor needs model weights this server "
                f"does not have; available: {available}",
            )
        else:
            reader.fail("module", value, f"unknown preprocessor; available: {available}")
    return found


def _no_model(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none"))


def _model(reader: _Reader, models: tuple[ControlNetFile, ...]) -> ControlNetFile | None:
    value = reader.raw.get("model")
    if _no_model(value):
        titles = ", ".join(repr(m.title) for m in models) or "(none installed)"
        reader.fail(
            "model", value, f"an enabled unit needs a ControlNet model; available: {titles}"
        )
        return None
    try:
        return find_model(models, value, field=f"{reader.field}.model")
    except RequestError as err:
        reader.problems.extend(err.problems)
        return None


def _images(reader: _Reader) -> tuple[Image.Image | None, Image.Image | None]:
    image_value, mask_value = split_image(reader.raw.get("image"))
    if _absent(reader.raw.get("mask")) is not None:
        mask_value = reader.raw["mask"]
    image = mask = None
    try:
        if image_value is not None:
            image = decode_image(image_value, field=f"{reader.field}.image")
        if mask_value is not None:
            mask = decode_mask(mask_value, field=f"{reader.field}.mask")
    except RequestError as err:
        reader.problems.extend(err.problems)
    if image is not None and mask is not None and image.size != mask.size:
        reader.fail(
            "mask",
            f"{mask.width}x{mask.height}",
            f"the mask must be as large as the image ({image.width}x{image.height})",
        )
    return image, mask


def parse_unit(
    raw: Any, index: int, field: str, models: tuple[ControlNetFile, ...]
) -> tuple[Unit | None, list[Problem]]:
    """One unit: (the unit, or None when disabled or broken; its problems)."""
    if not isinstance(raw, Mapping):
        return None, [Problem(field, raw, "expected a ControlNet unit object")]
    reader = _Reader(raw, field)
    # Forge's default (Mikubill's is False): most clients omit `enabled` on units they send.
    if not reader.flag("enabled", True):
        return None, reader.problems
    if index >= MAX_UNITS:
        return None, [
            Problem(
                field,
                f"unit {index}",
                f"at most {MAX_UNITS} ControlNet units "
                "(webui's control_net_unit_count); webui would ignore this one",
            )
        ]
    module = _module(reader)
    # Model-free modules (the extension's do_not_need_model) never look the model up: it is
    # ignored there, so any value (the API default is "None") is accepted.
    raw_model = reader.raw.get("model")
    free = module is not None and module.model_free
    model = None if free else _model(reader, models)
    image, mask = _images(reader)
    ints3 = {0: 0, 1: 1, 2: 2}
    control_names = {m.lower(): i for i, m in enumerate(CONTROL_MODES)}
    start = reader.number("guidance_start", 0.0, 0.0, 1.0)
    end = reader.number("guidance_end", 1.0, 0.0, 1.0)
    if start > end:
        reader.fail("guidance_start", start, f"must not be above guidance_end ({end})")
    hr = reader.raw.get("hr_option", "Both")
    hr_by_name = {o.lower(): o for o in HR_OPTIONS}
    if not isinstance(hr, str) or hr.strip().lower() not in hr_by_name:
        reader.fail("hr_option", hr, f"allowed: {', '.join(map(repr, HR_OPTIONS))}")
        hr = "Both"
    unit = Unit(
        index=index,
        field=field,
        module=module or PREPROCESSORS["none"],
        model=None if free else model or ControlNetFile(Path(), "", ""),
        image=image,
        mask=mask,
        weight=reader.number("weight", 1.0, 0.0, 2.0),
        resize_mode=reader.choice("resize_mode", 1, _RESIZE_BY_NAME, {**ints3, 3: 0}, RESIZE_MODES),
        processor_res=int(reader.number("processor_res", -1)),
        threshold_a=reader.number("threshold_a", -1.0),
        threshold_b=reader.number("threshold_b", -1.0),
        guidance_start=start,
        guidance_end=end,
        pixel_perfect=reader.flag("pixel_perfect", False),
        control_mode=reader.choice("control_mode", 0, control_names, ints3, CONTROL_MODES),
        hr_option=hr_by_name[hr.strip().lower()],
        save_detected_map=reader.flag("save_detected_map", True),
        ignored_model=None if not free or _no_model(raw_model) else str(raw_model)[:100],
    )
    size_problem = _working_size_problem(unit)
    if size_problem is not None:
        reader.problems.append(size_problem)
    if reader.problems or module is None or (model is None and not free):
        return None, reader.problems
    return unit, []


def _working_size_problem(unit: Unit) -> Problem | None:
    """The preprocessor's map size, checked while validating, before any model work, where
    the unit alone decides it: its own image at its processor_res, bounded to the slider as
    the extension does. With pixel_perfect (the resolution follows the generation size) or
    img2img's image, the extension makes the same check before it loads the unit's model."""
    slider = unit.module.resolution
    if unit.image is None or slider is None or unit.pixel_perfect:
        return None
    res = int(slider.bound(unit.processor_res))
    return working_size_problem(unit.module, unit.image.size, res, f"{unit.field}.image")


def parse_units(args: list[Any], field: str, models: tuple[ControlNetFile, ...]) -> list[Unit]:
    """Every enabled unit of `args`; all problems of all units in one RequestError."""
    units: list[Unit] = []
    problems: list[Problem] = []
    for index, raw in enumerate(args):
        unit, found = parse_unit(raw, index, f"{field}.args[{index}]", models)
        problems.extend(found)
        if unit is not None:
            units.append(unit)
    if problems:
        raise RequestError(problems)
    return units
