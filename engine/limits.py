"""What this server accepts, and the work a request implies, checked before any model work.

`Limits` holds the configurable bounds (SD_LIMIT_* environment variables, read once at setup
and passed explicitly to every parser: there is no module default a caller could silently
get). `implied_work` turns a request's checked values into the sizes and step counts that
webui's rules derive from them (legacy first-pass size, hires target, img2img and hires
schedules after the denoising rule), and `work_problems` checks those against the limits, so
that a bound on a field cannot be sidestepped through a field it derives from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from .errors import Problem, RequestError
from .geometry import firstphase_to_hires, hires_target, img2img_steps


@dataclass(frozen=True)
class Range:
    """Inclusive numeric bounds."""

    lo: float
    hi: float

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int | float) and self.lo <= value <= self.hi

    def describe(self) -> str:
        return f"from {_num(self.lo)} to {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Limits:
    """What this server accepts. One object so a deployment can make it configurable."""

    width: Range = Range(64, 2048)
    height: Range = Range(64, 2048)
    steps: Range = Range(1, 150)
    batch_size: Range = Range(1, 8)
    n_iter: Range = Range(1, 32)
    cfg_scale: Range = Range(-100, 100)
    # -1 means "random" (webui: only -1; any other negative is a fixed seed). torch's
    # manual_seed takes [-2**63, 2**64); image i uses seed + i + eta_noise_seed_delta, so both
    # stay inside +-2**62 on the negative side and the sum can never leave torch's range.
    seed: Range = Range(-(2**62), 2**63 - 1)
    prompt_chars: int = 20000
    # batch_size * n_iter: images one request may ask for.
    images: int = 64
    # width * height of one image, first pass or hires target (each side is capped above too).
    pixels: int = 2048 * 2048
    # images * width * height of everything one request returns.
    total_pixels: int = 64 * 1024 * 1024
    # Sampling steps of the whole request: images * (steps run in the first pass + steps run
    # in the hires pass). See README "Limits" for the formula.
    unet_evals: int = 10000
    # Length of one noise schedule. webui's img2img rule with img2img_fix_steps (and always for
    # the hires pass) builds int(steps / denoising_strength) steps and runs the last `steps`:
    # denoising 0.01 at 150 steps is 15000; 1e-300 would be a schedule no machine can hold.
    schedule_steps: int = 15000
    # UTF-8 bytes of the api_json text (base64 init images count: a 20 MB image is ~27 MB).
    payload_bytes: int = 64 * 1024 * 1024
    # Nesting of [ and { in api_json; deeper JSON would exhaust Python's recursion limit.
    json_depth: int = 32
    # <lora:...>/<lyco:...> tags in one prompt field (each field counts its own).
    lora_tags: int = 16
    # Enabled ControlNet units (webui's control_net_unit_count defaults to 3).
    controlnet_units: int = 3
    # What a prompt's syntax implies (engine/prompt_limits.py): AND parts (UNet batch rows per
    # step), BREAK chunks, distinct texts over the steps from prompt editing, and their length.
    and_parts: int = 16
    prompt_chunks: int = 32
    prompt_schedule: int = 32
    scheduled_chars: int = 80000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """Limits with SD_LIMIT_* environment overrides (table: LIMIT_ENV); bad values fail."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}
        for var, (name, kind) in LIMIT_ENV.items():
            text = env.get(var)
            if text is None or not text.strip():
                continue
            try:
                number = int(text.strip())
            except ValueError:
                raise ValueError(f"{var}={text!r}: must be a positive integer") from None
            if number < 1:
                raise ValueError(f"{var}={text!r}: must be a positive integer")
            current = getattr(cls(), name)
            changes[name] = Range(current.lo, number) if kind == "range" else number
        return cls(**changes)


# Environment variable -> (Limits field, "range" (sets the upper bound) or "int").
LIMIT_ENV: Final[dict[str, tuple[str, Literal["range", "int"]]]] = {
    "SD_LIMIT_MAX_WIDTH": ("width", "range"),
    "SD_LIMIT_MAX_HEIGHT": ("height", "range"),
    "SD_LIMIT_MAX_PIXELS": ("pixels", "int"),
    "SD_LIMIT_MAX_TOTAL_PIXELS": ("total_pixels", "int"),
    "SD_LIMIT_MAX_STEPS": ("steps", "range"),
    "SD_LIMIT_MAX_SCHEDULE_STEPS": ("schedule_steps", "int"),
    "SD_LIMIT_MAX_UNET_EVALS": ("unet_evals", "int"),
    "SD_LIMIT_MAX_BATCH_SIZE": ("batch_size", "range"),
    "SD_LIMIT_MAX_N_ITER": ("n_iter", "range"),
    "SD_LIMIT_MAX_IMAGES": ("images", "int"),
    "SD_LIMIT_MAX_PROMPT_CHARS": ("prompt_chars", "int"),
    "SD_LIMIT_MAX_PAYLOAD_BYTES": ("payload_bytes", "int"),
    "SD_LIMIT_MAX_JSON_DEPTH": ("json_depth", "int"),
    "SD_LIMIT_MAX_LORA_TAGS": ("lora_tags", "int"),
    "SD_LIMIT_MAX_CONTROLNET_UNITS": ("controlnet_units", "int"),
    "SD_LIMIT_MAX_AND_PARTS": ("and_parts", "int"),
    "SD_LIMIT_MAX_PROMPT_CHUNKS": ("prompt_chunks", "int"),
    "SD_LIMIT_MAX_PROMPT_SCHEDULE": ("prompt_schedule", "int"),
    "SD_LIMIT_MAX_SCHEDULED_CHARS": ("scheduled_chars", "int"),
}


# --------------------------------------------------------------------------------------------
# Implied work
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One sampling pass: its image size, schedule length and steps actually run."""

    width: int
    height: int
    # Steps in the noise schedule: float because a schedule too long to build (steps / 1e-300)
    # is reported by its length, never computed.
    schedule: float
    run: int
    # The request fields that decided the size (for error messages).
    size_fields: str


@dataclass(frozen=True)
class Work:
    """What a request makes the worker do, by webui's rules."""

    images: int
    passes: tuple[Pass, ...]

    @property
    def output(self) -> Pass:
        return self.passes[-1]

    @property
    def unet_evals(self) -> int:
        """images * steps run over all passes (one evaluation = one step of the whole batch)."""
        return self.images * sum(p.run for p in self.passes)


def _schedule(steps: int, denoise: float, fix_steps: bool, limits: Limits) -> tuple[float, int]:
    """img2img_steps, but a schedule longer than the limit is measured, not built
    (int(steps / 1e-300) is a 300-digit number; steps / 5e-324 is inf)."""
    if fix_steps and denoise > 0:
        length = steps / min(denoise, 0.999)
        if length > limits.schedule_steps:
            return (length if math.isinf(length) else math.floor(length)), steps
    return img2img_steps(steps, denoise, fix_steps)


# The fields implied_work reads, by mode.
_COMMON_WORK_FIELDS: Final = frozenset(
    {"steps", "denoising_strength", "batch_size", "n_iter", "width", "height"}
)
WORK_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "img2img": _COMMON_WORK_FIELDS,
    "txt2img": _COMMON_WORK_FIELDS
    | {
        "enable_hr",
        "firstphase_width",
        "firstphase_height",
        "hr_scale",
        "hr_resize_x",
        "hr_resize_y",
        "hr_second_pass_steps",
    },
}


def implied_work(mode: str, values: Mapping[str, Any], fix_steps: bool, limits: Limits) -> Work:
    """The passes a checked txt2img/img2img request implies (k-diffusion step counts; webui's
    DDIM/PLMS/UniPC run one step fewer, so this is an upper bound).

    Raises RequestError for combinations webui's rules cannot size (one firstphase side set).
    """
    steps, denoise = values["steps"], values["denoising_strength"]
    images = values["batch_size"] * values["n_iter"]
    width, height = values["width"], values["height"]
    if mode == "img2img":
        schedule, run = _schedule(steps, denoise, fix_steps, limits)
        return Work(images, (Pass(width, height, schedule, run, "width*height"),))
    size_fields = "width*height"
    if values["firstphase_width"] or values["firstphase_height"]:
        width, height = firstphase_to_hires(
            width, height, values["firstphase_width"], values["firstphase_height"]
        )
        size_fields = "firstphase_width*firstphase_height"
    first = Pass(width, height, steps, steps, size_fields)
    if not values["enable_hr"]:
        return Work(images, (first,))
    rx, ry = values["hr_resize_x"], values["hr_resize_y"]
    target = hires_target(width, height, values["hr_scale"], rx, ry)
    hr_fields = "hr_resize_x*hr_resize_y" if rx or ry else "hr_scale"
    schedule, run = _schedule(values["hr_second_pass_steps"] or steps, denoise, True, limits)
    # The latent is upscaled to resize_x x resize_y before any crop: that is the work's size.
    second = Pass(target.resize_x, target.resize_y, schedule, run, hr_fields)
    return Work(images, (first, second))


def _count(x: float) -> str:
    return str(int(x)) if x < 1e12 else f"{x:.3g}"


def work_problems(work: Work, values: Mapping[str, Any], limits: Limits) -> list[Problem]:
    """Every implied figure against its limit; each problem names the fields behind it."""
    problems: list[Problem] = []
    for number, step in enumerate(work.passes):
        area = step.width * step.height
        if step.size_fields != "width*height" and area > limits.pixels:
            what = "hires target" if number else "first pass"
            problems.append(
                Problem(
                    step.size_fields,
                    values.get(step.size_fields.split("*")[0]),
                    f"the {what} would be {step.width}x{step.height} = {area} pixels; at most "
                    f"{limits.pixels} pixels per image (SD_LIMIT_MAX_PIXELS)",
                )
            )
        if step.schedule > limits.schedule_steps:
            field = "hr_second_pass_steps" if number else "steps"
            problems.append(
                Problem(
                    "denoising_strength",
                    values["denoising_strength"],
                    f"{field} {values[field] or values['steps']} at this denoising strength "
                    f"make a {_count(step.schedule)}-step schedule (webui builds steps / denoising "
                    f"steps and runs the last ones); at most {limits.schedule_steps} "
                    "(SD_LIMIT_MAX_SCHEDULE_STEPS): raise denoising_strength or lower the steps",
                )
            )
    if problems:  # the totals below would only repeat an impossible figure
        return problems
    evals = work.unet_evals
    if evals > limits.unet_evals:
        runs = " + ".join(str(p.run) for p in work.passes)
        problems.append(
            Problem(
                "steps*batch_size*n_iter",
                evals,
                f"{work.images} images x ({runs}) steps = {evals} UNet evaluations; at most "
                f"{limits.unet_evals} per request (SD_LIMIT_MAX_UNET_EVALS)",
            )
        )
    out = work.output
    total = work.images * out.width * out.height
    if total > limits.total_pixels:
        problems.append(
            Problem(
                "batch_size*n_iter*" + out.size_fields,
                total,
                f"{work.images} images of {out.width}x{out.height} = {total} pixels; at most "
                f"{limits.total_pixels} pixels per request (SD_LIMIT_MAX_TOTAL_PIXELS)",
            )
        )
    return problems


def check_work(
    mode: str, values: Mapping[str, Any], fix_steps: bool, limits: Limits
) -> list[Problem]:
    """Problems of the work a request implies ([] when it fits the limits, or when a field it
    needs already has a problem of its own)."""
    if not WORK_FIELDS[mode] <= values.keys():
        return []
    try:
        work = implied_work(mode, values, fix_steps, limits)
    except RequestError as err:
        return list(err.problems)
    return work_problems(work, values, limits)


__all__ = [
    "LIMIT_ENV",
    "WORK_FIELDS",
    "Limits",
    "Pass",
    "Range",
    "Work",
    "check_work",
    "implied_work",
    "work_problems",
]
