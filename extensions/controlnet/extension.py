"""The ControlNet extension: units in, one UNet hook per enabled unit out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from engine.catalog import Catalog
from engine.errors import Problem, RequestError
from engine.extensions import Effects, GenerationContext, Listing, script_args
from engine.loading import Placement

from .hook import ControlNetHook, image_tensor
from .inpaint_only import InpaintComposite, InpaintRestore
from .models import ControlNetFile, LoadedControlNet, ModelCache, scan
from .preprocessors import (
    HIDDEN_SLIDER,
    PREPROCESSORS,
    RESOLUTION,
    Slider,
    run_preprocessor,
    working_size_problem,
)
from .reference import MODES as REFERENCE_MODES
from .reference import ReferenceHook, ReferenceUnit
from .units import CONTROL_MODES, RESIZE_MODES, Unit, parse_units

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = 0, 1, 2
# img2img resize_mode -> ControlNet resize mode (3, latent upscale, is a plain resize there).
_FROM_IMG2IMG = {0: JUST_RESIZE, 1: CROP_AND_RESIZE, 2: RESIZE_AND_FILL, 3: JUST_RESIZE}


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, mode: int) -> int:
    """Mikubill `pixel_perfect_resolution`: the preprocessor resolution at which the map
    lands 1:1 on the target after the unit's resize (min scale for Resize and Fill)."""
    raw_w, raw_h = size
    k_h, k_w = height / raw_h, width / raw_w
    k = min(k_h, k_w) if mode == RESIZE_AND_FILL else max(k_h, k_w)
    return int(np.round(k * min(raw_h, raw_w)))


def _resize_map(image: Image.Image, width: int, height: int) -> Image.Image:
    # Mikubill high_quality_resize, simplified: area when shrinking, cubic when enlarging; a
    # binary map (edges, thresholds) stays binary.
    if image.size == (width, height):
        return image
    shrink = width * height < image.width * image.height
    resample = Image.Resampling.BOX if shrink else Image.Resampling.BICUBIC
    resized = image.resize((width, height), resample)
    values = np.unique(np.asarray(image))
    if len(values) <= 2 and set(values.tolist()) <= {0, 255}:
        resized = resized.point(lambda v: 255 if v > 127 else 0)
    return resized


def fit_map(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """Mikubill `detectmap_proc`: the detected map at the generation size."""
    if mode == JUST_RESIZE:
        return _resize_map(image, width, height)
    k_h, k_w = height / image.height, width / image.width
    if mode == CROP_AND_RESIZE:
        k = max(k_h, k_w)
        resized = _resize_map(image, round(image.width * k), round(image.height * k))
        left = max(0, (resized.width - width) // 2)
        top = max(0, (resized.height - height) // 2)
        return resized.crop((left, top, left + width, top + height))
    # Resize and Fill: fit inside, on a background of the median border colour.
    k = min(k_h, k_w)
    array = np.asarray(image.convert("RGB"))
    borders = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]], axis=0)
    colour = tuple(int(c) for c in np.median(borders, axis=0).astype(np.uint8))
    resized = _resize_map(image.convert("RGB"), round(image.width * k), round(image.height * k))
    canvas = Image.new("RGB", (width, height), colour)
    canvas.paste(
        resized, (max(0, (width - resized.width) // 2), max(0, (height - resized.height) // 2))
    )
    return canvas


def fit_mask(mask: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """An inpaint mask at the generation size, binary (Mikubill high_quality_resize keeps the
    alpha apart and thresholds it at 127). Resize and Fill pads with "inpaint here", as the
    inpaint modules' fill_mask_with_one_when_resize_and_fill."""
    if mode != RESIZE_AND_FILL:
        fitted = fit_map(mask.convert("RGB"), width, height, mode).convert("L")
    else:
        k = min(height / mask.height, width / mask.width)
        resized = mask.resize((round(mask.width * k), round(mask.height * k)))
        fitted = Image.new("L", (width, height), 255)
        fitted.paste(
            resized, (max(0, (width - resized.width) // 2), max(0, (height - resized.height) // 2))
        )
    return fitted.point(lambda v: 255 if v > 127 else 0)


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """ "L" mask -> (1, 1, H, W) float in {0, 1}."""
    array = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None, None]


def _inpaint_mask(ctx: GenerationContext, unit: Unit, image: Image.Image) -> Image.Image:
    """The unit's mask; else, for a unit using the img2img image, img2img's mask as the
    extension's prepare_mask makes it (inverted when asked, blurred by mask_blur); else an
    empty mask (the extension concatenates zeros)."""
    if unit.mask is not None:
        return unit.mask.convert("L").resize(image.size)
    request = ctx.request
    if unit.image is None and ctx.init_mask is not None:
        mask = ctx.init_mask.convert("L").resize(image.size)
        if getattr(request, "inpainting_mask_invert", 0):
            mask = ImageOps.invert(mask)
        blur = getattr(request, "mask_blur", None)
        blur = getattr(request, "mask_blur_x", 0) if blur is None else blur
        if blur and blur > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
        return mask
    return Image.new("L", image.size, 0)


def _show_inpaint(detected: Image.Image, mask: Image.Image) -> Image.Image:
    """The detected map as the extension shows it: the image, black where it inpaints."""
    array = np.asarray(detected.convert("RGB")).copy()
    array[np.asarray(mask.convert("L").resize(detected.size)) > 127] = 0
    return Image.fromarray(array)


def _inpaint_only_fallback(ctx: GenerationContext, unit: Unit) -> tuple[Unit, str | None]:
    """Mikubill: "inpaint_only" with img2img inpainting "falls back to
    inpaint_global_harmonious" (A1111 inpaint and ControlNet inpaint duplicated)."""
    if unit.module.name != "inpaint_only" or ctx.mode != "img2img" or ctx.init_mask is None:
        return unit, None
    note = (
        f"{unit.field}.module: inpaint_only with img2img inpainting runs as "
        "inpaint_global_harmonious, as the ControlNet extension does (A1111 inpaint and "
        "ControlNet inpaint duplicated)"
    )
    return replace(unit, module=PREPROCESSORS["inpaint"]), note


def _inpaint_only_effects(
    ctx: GenerationContext, unit: Unit, colour: Image.Image, mask: Image.Image
) -> Effects:
    """The restore hook and the final composite of inpaint_only (see inpaint_only.py)."""
    if unit.module.name != "inpaint_only":
        return Effects()
    restore = InpaintRestore(
        vae=ctx.loaded.pipe.vae,
        colour=colour,
        mask=mask,
        weight=unit.weight,
        alphas_cumprod=ctx.loaded.pipe.scheduler.alphas_cumprod,
    )
    return Effects(cfg_hooks=[restore], image_hooks=[InpaintComposite(colour, mask)])


def _without_hires(ctx: GenerationContext, unit: Unit) -> Unit:
    """Mikubill: `hr_option=unit.hr_option if high_res_fix else HiResFixOption.BOTH`, so a
    "High res only" unit still runs in a request without a hires pass (img2img, or txt2img
    without enable_hr)."""
    high_res_fix = ctx.mode == "txt2img" and bool(getattr(ctx.request, "enable_hr", False))
    return unit if high_res_fix else replace(unit, hr_option="Both")


def _reference_effects(
    ctx: GenerationContext, references: list[tuple[Unit, ReferenceUnit]]
) -> Effects:
    """One ReferenceHook per pass for the reference units that run in it (hr_option)."""
    pipe = ctx.loaded.pipe

    def hooks(hires: bool, skip: str) -> list[Any]:
        units = tuple(ref for unit, ref in references if unit.hr_option != skip)
        if not units:
            return []
        return [ReferenceHook(units, pipe.vae, pipe.scheduler.alphas_cumprod, hires=hires)]

    return Effects(
        unet_hooks=hooks(False, "High res only"), hires_unet_hooks=hooks(True, "Low res only")
    )


def bound_slider(
    value: float, slider: Slider | None, field: str, module: str
) -> tuple[float, str | None]:
    """Mikubill `bound_check_params`: a value outside the module's slider range becomes the
    slider's default (-1, the API default, silently; anything else with a warning naming the
    field). This is also what bounds the work: processor_res 1e6 would be a 1e12-pixel map.
    A module without the slider ignores the value, but the extension still bounds it by its
    invisible slider (PreprocessorParameter: 0..1, default 0.5), which the infotext shows:
    the same here, silently."""
    if slider is None:
        return (value if HIDDEN_SLIDER.contains(value) else HIDDEN_SLIDER.value), None
    if slider.contains(value):
        return value, None
    if value == -1:
        return float(slider.value), None
    return float(slider.value), (
        f"{field}: {value:g} is outside {module}'s {slider.name} range "
        f"{slider.min:g}..{slider.max:g}; used the default {slider.value:g}, as the "
        "ControlNet extension does"
    )


class ControlNetExtension:
    """`alwayson_scripts.controlnet` (title "ControlNet", matched case-insensitively)."""

    title = "ControlNet"

    def __init__(self) -> None:
        self.models: tuple[ControlNetFile, ...] = ()
        self.cache: ModelCache | None = None

    def setup(self, catalog: Catalog, placement: Placement) -> None:
        """List controlnet/ files with webui's names; models load on first use, then stay."""
        self.models = scan(catalog.files("controlnet"))
        self.cache = ModelCache(placement)

    def parse_args(self, value: Any, *, field: str) -> list[Unit]:
        """The enabled units (see units.py for every accepted form)."""
        return parse_units(script_args(value, field=field), field, self.models)

    def prepare(self, ctx: GenerationContext, args: Any) -> Effects:
        """Preprocess every unit's image, load its model and make its hook (one hook per pass
        for all reference units: they share the UNet's attention layers)."""
        assert self.cache is not None, "setup() was not called"
        effects = Effects()
        problems: list[Problem] = []
        references: list[tuple[Unit, ReferenceUnit]] = []
        for sent in args:
            unit = _without_hires(ctx, sent)
            try:
                unit_effects, reference = self._prepare_unit(ctx, unit)
            except RequestError as err:
                problems.extend(err.problems)
                continue
            effects = effects.merge(unit_effects)
            if reference is not None:
                references.append((unit, reference))
        if problems:
            raise RequestError(problems)
        return effects.merge(_reference_effects(ctx, references))

    def _prepare_unit(
        self, ctx: GenerationContext, unit: Unit
    ) -> tuple[Effects, ReferenceUnit | None]:
        assert self.cache is not None
        image, resize_mode = unit.image, unit.resize_mode
        unit, fallback = _inpaint_only_fallback(ctx, unit)
        notes = [fallback] if fallback else []
        image_field = f"{unit.field}.image"
        if image is None:
            if ctx.mode != "img2img" or not ctx.init_images:
                raise RequestError.single(
                    image_field,
                    None,
                    "controlnet is enabled but no input image is given (send `image`, or use "
                    "img2img, where init_images[0] is used)",
                )
            image, image_field = ctx.init_images[0], "init_images[0]"
            resize_mode = _FROM_IMG2IMG.get(ctx.resize_mode, JUST_RESIZE)
        pre = unit.module
        res, res_note = self._resolution(unit, image, ctx, resize_mode)
        # Before the model loads: the map size follows the aspect ratio (units.py checks the
        # cases it can size alone; pixel_perfect and img2img's image are known only here).
        size_problem = working_size_problem(pre, image.size, res, image_field)
        if size_problem is not None:
            raise RequestError([size_problem])
        if unit.ignored_model is not None:
            notes.append(
                f"{unit.field}.model: {unit.ignored_model!r} is not used by the model-free "
                f"module {unit.module.name} (the ControlNet extension ignores it too)"
            )
        loaded = None if unit.model is None else self._model(ctx, unit.model, unit.field)
        a, a_note = bound_slider(
            unit.threshold_a, pre.slider_a, f"{unit.field}.threshold_a", pre.name
        )
        b, b_note = bound_slider(
            unit.threshold_b, pre.slider_b, f"{unit.field}.threshold_b", pre.name
        )
        detected = run_preprocessor(pre, image, res, a, b)
        colour = fit_map(detected, ctx.width, ctx.height, resize_mode)
        control = image_tensor(colour)
        inpaint_only = Effects()
        if pre.uses_mask:
            mask = _inpaint_mask(ctx, unit, image)
            fitted = fit_mask(mask, ctx.width, ctx.height, resize_mode)
            control = torch.cat([control, mask_tensor(fitted)], dim=1)
            detected = _show_inpaint(detected, mask)
            inpaint_only = _inpaint_only_effects(ctx, unit, colour, fitted)
        info = (
            f"Module: {pre.name}, Model: {unit.model_title}, Weight: {unit.weight}, "
            f"Resize Mode: {RESIZE_MODES[resize_mode]}, Processor Res: {res}, "
            f"Threshold A: {a}, Threshold B: {b}, Guidance Start: {unit.guidance_start}, "
            f"Guidance End: {unit.guidance_end}, Pixel Perfect: {unit.pixel_perfect}, "
            f"Control Mode: {CONTROL_MODES[unit.control_mode]}"
        )
        save = unit.save_detected_map and pre.name != "none"
        # The real extension writes its infotext from `process`, or from before_process_batch
        # when the request names a refiner (process_has_sdxl_refiner): after webui's
        # hires/img2img keys then.
        late = getattr(ctx.request, "refiner_checkpoint", None) is not None
        entry = {f"ControlNet {unit.index}": info}
        common = Effects(
            infotext={} if late else entry,
            batch_infotext=entry if late else {},
            extra_images=[detected] if save else [],
            warnings=[note for note in (*notes, res_note, a_note, b_note) if note],
        )
        if loaded is None:  # a reference module: the hook is made for all of them at once
            attention, adain = REFERENCE_MODES[pre.name]
            reference = ReferenceUnit(
                index=unit.index,
                attention=attention,
                adain=adain,
                weight=unit.weight,
                guidance_start=unit.guidance_start,
                guidance_end=unit.guidance_end,
                style_fidelity=a,
                control_mode=unit.control_mode,
                image=colour,
            )
            return common, reference
        hook = ControlNetHook(
            model=loaded.model,
            control=control,
            weight=unit.weight,
            guidance_start=unit.guidance_start,
            guidance_end=unit.guidance_end,
            control_mode=unit.control_mode,
        )
        hooks = Effects(
            unet_hooks=[hook] if unit.hr_option != "High res only" else [],
            hires_unet_hooks=[hook] if unit.hr_option != "Low res only" else [],
        )
        return hooks.merge(common).merge(inpaint_only), None

    def _model(self, ctx: GenerationContext, model: ControlNetFile, field: str) -> LoadedControlNet:
        """The unit's ControlNet, loaded, of the checkpoint's family."""
        assert self.cache is not None
        loaded = self.cache.get(model, beside=ctx.loaded.info.title)
        family = ctx.loaded.family
        unet_cross = int(ctx.loaded.pipe.unet.config.cross_attention_dim)
        if loaded.family is not family or loaded.cross_attention_dim != unet_cross:
            raise RequestError.single(
                f"{field}.model",
                model.title,
                f"this is a {loaded.family.value} ControlNet; the checkpoint "
                f"{ctx.loaded.info.title!r} is {family.value}; pick a matching ControlNet",
            )
        return loaded

    @staticmethod
    def _resolution(
        unit: Unit, image: Image.Image, ctx: GenerationContext, mode: int
    ) -> tuple[int, str | None]:
        slider = unit.module.resolution
        if unit.pixel_perfect and slider is not None:
            return pixel_perfect_resolution(image.size, ctx.width, ctx.height, mode), None
        value, note = bound_slider(
            unit.processor_res,
            slider or RESOLUTION,
            f"{unit.field}.processor_res",
            unit.module.name,
        )
        return int(value), note if slider is not None else None

    def model_list(self) -> dict[str, list[str]]:
        """GET /controlnet/model_list."""
        return {"model_list": [m.title for m in self.models]}

    @staticmethod
    def module_list() -> dict[str, Any]:
        """GET /controlnet/module_list (alias_names=false)."""
        return {
            "module_list": list(PREPROCESSORS),
            "module_detail": {
                name: {"model_free": pre.model_free, "sliders": pre.sliders()}
                for name, pre in PREPROCESSORS.items()
            },
        }

    def listings(self) -> Mapping[str, Listing]:
        return {
            "controlnet/model_list": self.model_list,
            "controlnet/module_list": self.module_list,
            "controlnet/version": lambda: {"version": 3},
            "controlnet/settings": lambda: {"control_net_unit_count": 3},
        }
