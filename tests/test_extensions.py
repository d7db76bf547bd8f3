"""The extension contract, the ControlNet extension and the CFG rescale extension."""

from __future__ import annotations

import base64
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.api import Engine, EngineConfig
from engine.catalog import Catalog
from engine.errors import ModelLoadError, RequestError, UnknownName
from engine.extensions import ExtensionRegistry, GenerationContext
from engine.kdiffusion import Noise, Options, sample_euler, sample_heun
from engine.loading import LoadedCheckpoint, Placement
from engine.sampling import (
    CFGDenoiser,
    CondPart,
    Stage,
    StepConditioning,
    StepInfo,
    UNetExtras,
)
from engine.schedules import Discretization
from extensions.cfg_rescale import CFGRescaleExtension, RescaleArgs, rescale_cfg
from extensions.controlnet import ControlNetExtension
from extensions.controlnet.extension import fit_map, pixel_perfect_resolution
from extensions.controlnet.hook import ControlNetHook, active, image_tensor, soft_scales
from extensions.controlnet.preprocessors import PREPROCESSORS, run_preprocessor
from tests.helpers import SD1, SDXL, payload, pixels

FIELD = "alwayson_scripts.controlnet"


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def square(size: int = 64, lo: int = 0, hi: int = 255) -> Image.Image:
    """A bright square centred on a dark background."""
    array = np.full((size, size, 3), lo, dtype=np.uint8)
    q = size // 4
    array[q : size - q, q : size - q] = hi
    return Image.fromarray(array)


IMAGE = b64(square())
MASK = b64(Image.new("L", (64, 64), 255))


@pytest.fixture(scope="module")
def controlnet(tiny_models_dir: Path) -> ControlNetExtension:
    ext = ControlNetExtension()
    ext.setup(Catalog.scan(tiny_models_dir), Placement("cpu", torch.float32))
    return ext


def loaded(engine: Engine, name: str) -> LoadedCheckpoint:
    return next(v for k, v in engine.models.cache.loaded.items() if k.startswith(name))


def context(engine: Engine, name: str = SD1, **changes: Any) -> GenerationContext:
    values: dict[str, Any] = {
        "mode": "txt2img",
        "loaded": loaded(engine, name),
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "steps": 4,
    }
    values.update(changes)
    return GenerationContext(**values)


def unit(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"module": "canny", "model": "tiny-controlnet-sd15", "image": IMAGE}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


# --------------------------------------------------------------------------------------------
# Registry


def test_discover_finds_both_extensions_and_resolves_case_insensitively() -> None:
    registry = ExtensionRegistry.discover()
    assert {"ControlNet", "CFG Rescale Extension"} <= set(registry.titles)
    assert registry.resolve("controlnet", field="x").title == "ControlNet"
    assert registry.resolve("cfg rescale extension", field="x").title == "CFG Rescale Extension"
    assert "controlnet/model_list" in registry.listings()


def test_unknown_extension_lists_the_titles() -> None:
    registry = ExtensionRegistry.discover()
    with pytest.raises(UnknownName) as err:
        registry.parse({"adetailer": {"args": []}})
    assert err.value.problems[0].field == "alwayson_scripts.adetailer"
    assert "ControlNet" in str(err.value)


def test_an_extension_that_fails_to_import_fails_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "badexts"
    (package / "broken").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "broken" / "__init__.py").write_text("import no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="broken"):
        ExtensionRegistry.discover("badexts")


def test_an_extension_instance_in_place_of_a_class_fails_discovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An instance would be shared by every engine of the process (issue 13).
    package = tmp_path / "sharedexts"
    (package / "single").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "single" / "__init__.py").write_text(
        "from extensions.cfg_rescale import CFGRescaleExtension\n"
        "EXTENSION = CFGRescaleExtension()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="must be a class"):
        ExtensionRegistry.discover("sharedexts")


def test_every_discovery_makes_new_instances() -> None:
    first, second = ExtensionRegistry.discover(), ExtensionRegistry.discover()
    assert first.titles == second.titles
    for a, b in zip(first.extensions, second.extensions, strict=True):
        assert a is not b


def test_a_second_engine_leaves_the_first_ones_controlnets_alone(
    engine: Engine, tiny_models_dir: Path, tmp_path: Path
) -> None:
    # Issue 13: extension objects were process-wide singletons that Engine.setup wrote into,
    # so a second engine over a folder without ControlNets emptied the first one's list.
    before = engine.handle("controlnet/model_list", "{}").listing
    assert before["model_list"]
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny_models_dir / "checkpoints" / SD1, tmp_path / "checkpoints" / SD1)
    other = Engine.setup(EngineConfig(models_dir=tmp_path, cache_dir=tmp_path / ".cache"))
    assert other.handle("controlnet/model_list", "{}").listing == {"model_list": []}
    assert engine.handle("controlnet/model_list", "{}").listing == before
    units = [unit(model=before["model_list"][0])]
    parsed = engine.models.extensions.parse({"controlnet": {"args": units}})  # type: ignore[union-attr]
    assert len(parsed[0][1]) == 1


def test_registry_reports_problems_of_every_extension_at_once(
    controlnet: ControlNetExtension,
) -> None:
    registry = ExtensionRegistry([controlnet, CFGRescaleExtension()])
    with pytest.raises(RequestError) as err:
        registry.parse(
            {
                "ControlNet": {"args": [unit(model="nope")]},
                "CFG Rescale Extension": {"args": [5]},
            }
        )
    fields = {p.field for p in err.value.problems}
    assert fields == {
        "alwayson_scripts.ControlNet.args[0].model",
        "alwayson_scripts.CFG Rescale Extension.args[0]",
    }


def test_an_entry_without_args_runs_nothing(engine: Engine) -> None:
    # webui reads an entry's args only when the key is there: `{}` leaves the scripts'
    # defaults (ControlNet off, rescale 0). It was read as one ControlNet unit without a model.
    body = json.loads(payload(steps=2))
    plain = engine.handle("auto", json.dumps(body))
    body["alwayson_scripts"] = {"controlnet": {}, "CFG Rescale Extension": {}}
    empty = engine.handle("auto", json.dumps(body))
    assert len(empty.images) == 1  # no detected map
    assert pixels(empty.images[0].data).tobytes() == pixels(plain.images[0].data).tobytes()
    assert json.loads(empty.info)["infotexts"] == json.loads(plain.info)["infotexts"]


# --------------------------------------------------------------------------------------------
# ControlNet units


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("Just Resize", 0),
        ("Crop and Resize", 1),
        ("Resize and Fill", 2),
        ("crop and resize", 1),
        ("Inner Fit (Scale to Fit)", 1),
        ("Scale to Fit (Inner Fit)", 1),
        ("Outer Fit (Shrink to Fit)", 2),
        ("Envelope (Outer Fit)", 2),
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 0),
        (None, 1),
    ],
)
def test_resize_mode_forms(controlnet: ControlNetExtension, value: Any, mode: int) -> None:
    (parsed,) = controlnet.parse_args({"args": [unit(resize_mode=value)]}, field=FIELD)
    assert parsed.resize_mode == mode


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("Balanced", 0),
        ("My prompt is more important", 1),
        ("ControlNet is more important", 2),
        ("controlnet is more important", 2),
        (0, 0),
        (1, 1),
        (2, 2),
        (None, 0),
    ],
)
def test_control_mode_forms(controlnet: ControlNetExtension, value: Any, mode: int) -> None:
    (parsed,) = controlnet.parse_args({"args": [unit(control_mode=value)]}, field=FIELD)
    assert parsed.control_mode == mode


def test_aliases_and_defaults(controlnet: ControlNetExtension) -> None:
    raw = {
        "module": "canny",
        "model": "tiny-controlnet-sd15",
        "input_image": IMAGE,
        "mask_image": MASK,
        "lowvram": True,
        "guidance": 0.5,
    }
    (parsed,) = controlnet.parse_args({"args": [raw]}, field=FIELD)
    assert parsed.image is not None and parsed.image.size == (64, 64)
    assert parsed.mask is not None
    assert parsed.guidance_end == 0.5
    assert (parsed.weight, parsed.resize_mode, parsed.control_mode) == (1.0, 1, 0)
    assert parsed.save_detected_map is True


def test_enabled_defaults_to_true_and_disabled_units_are_skipped(
    controlnet: ControlNetExtension,
) -> None:
    units = controlnet.parse_args(
        {"args": [unit(), unit(enabled=False, model="nope"), unit(enabled=True)]}, field=FIELD
    )
    assert [u.index for u in units] == [0, 2]


@pytest.mark.parametrize(
    "image",
    [
        IMAGE,
        "data:image/png;base64," + IMAGE,
        {"image": IMAGE, "mask": MASK},
        [IMAGE, MASK],
        [{"image": IMAGE, "mask": None}],
    ],
)
def test_image_forms(controlnet: ControlNetExtension, image: Any) -> None:
    (parsed,) = controlnet.parse_args({"args": [unit(image=image)]}, field=FIELD)
    assert parsed.image is not None and parsed.image.size == (64, 64)


@pytest.mark.parametrize("name", ["tiny-controlnet-sd15", "TINY-ControlNet-SD15", "controlnet"])
def test_model_without_hash(controlnet: ControlNetExtension, name: str) -> None:
    (parsed,) = controlnet.parse_args({"args": [unit(model=name)]}, field=FIELD)
    assert parsed.model is not None and parsed.model.name == "tiny-controlnet-sd15"


def test_model_with_hash_and_the_listing(controlnet: ControlNetExtension) -> None:
    title, xl_title = controlnet.model_list()["model_list"]
    assert title.startswith("tiny-controlnet-sd15 [") and len(title.split("[")[1]) == 9
    assert xl_title.startswith("tiny-controlnet-sdxl [")
    (parsed,) = controlnet.parse_args({"args": [unit(model=title)]}, field=FIELD)
    assert parsed.model is not None and parsed.model.title == title
    modules = controlnet.module_list()
    assert "canny" in modules["module_list"] and "canny" in modules["module_detail"]
    # The extension's do_not_need_model: the reference modules only ("none" takes a model).
    free = [name for name, d in modules["module_detail"].items() if d["model_free"]]
    assert free == ["reference_only", "reference_adain", "reference_adain+attn"]
    assert modules["module_detail"]["reference_only"]["sliders"] == [
        {
            "name": "Style Fidelity (only for Balanced mode)",
            "value": 0.5,
            "min": 0.0,
            "max": 1.0,
            "step": 0.01,
        }
    ]


def test_a_bare_unit_list_is_accepted(controlnet: ControlNetExtension) -> None:
    assert len(controlnet.parse_args([unit()], field=FIELD)) == 1


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"model": "nope"}, "model", "unknown ControlNet model"),
        ({"model": "None"}, "model", "needs a ControlNet model"),
        ({"model": None}, "model", "needs a ControlNet model"),
        ({"module": "sobel_magic"}, "module", "unknown preprocessor"),
        ({"module": "depth_midas"}, "module", "needs model weights"),
        ({"resize_mode": "Stretch"}, "resize_mode", "Crop and Resize"),
        ({"control_mode": 5}, "control_mode", "Balanced"),
        ({"weight": 3}, "weight", "0.0 to 2.0"),
        # NaN passes every comparison; inf and 10**400 are no slider value either (issue 16).
        ({"weight": "nan"}, "weight", "finite number"),
        ({"guidance_start": "nan"}, "guidance_start", "finite number"),
        ({"guidance_end": "NaN"}, "guidance_end", "finite number"),
        ({"processor_res": "nan"}, "processor_res", "finite number"),
        ({"processor_res": "inf"}, "processor_res", "finite number"),
        ({"processor_res": 10**400}, "processor_res", "finite number"),
        ({"threshold_a": "nan"}, "threshold_a", "finite number"),
        ({"threshold_a": "-inf"}, "threshold_a", "finite number"),
        ({"threshold_b": "inf"}, "threshold_b", "finite number"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_start", "guidance_end"),
        ({"image": "not base64!"}, "image", ""),
    ],
)
def test_unit_errors(
    controlnet: ControlNetExtension, changes: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(RequestError) as err:
        controlnet.parse_args({"args": [unit(**changes)]}, field=FIELD)
    problem = err.value.problems[0]
    assert problem.field == f"{FIELD}.args[0].{field}"
    assert words in str(problem)


def test_every_problem_of_every_unit_at_once(controlnet: ControlNetExtension) -> None:
    with pytest.raises(RequestError) as err:
        controlnet.parse_args(
            {"args": [unit(model="nope", module="openpose"), unit(weight="heavy")]}, field=FIELD
        )
    assert {p.field for p in err.value.problems} == {
        f"{FIELD}.args[0].model",
        f"{FIELD}.args[0].module",
        f"{FIELD}.args[1].weight",
    }


def test_more_enabled_units_than_webui_allows(controlnet: ControlNetExtension) -> None:
    with pytest.raises(RequestError, match="at most 3"):
        controlnet.parse_args({"args": [unit()] * 4}, field=FIELD)
    extra_disabled = [unit()] * 3 + [unit(enabled=False)]
    assert len(controlnet.parse_args({"args": extra_disabled}, field=FIELD)) == 3


def test_txt2img_unit_without_image_fails_in_prepare(
    controlnet: ControlNetExtension, engine: Engine
) -> None:
    units = controlnet.parse_args({"args": [unit(image=None)]}, field=FIELD)
    with pytest.raises(RequestError, match="no input image is given") as err:
        controlnet.prepare(context(engine), units)
    assert err.value.problems[0].field == f"{FIELD}.args[0].image"


def test_img2img_unit_without_image_uses_the_init_image(
    controlnet: ControlNetExtension, engine: Engine
) -> None:
    units = controlnet.parse_args({"args": [unit(image=None)]}, field=FIELD)
    ctx = context(engine, mode="img2img", init_images=(square(96),), resize_mode=0)
    effects = controlnet.prepare(ctx, units)
    assert len(effects.unet_hooks) == 1
    assert "Resize Mode: Just Resize" in effects.infotext["ControlNet 0"]


def test_a_controlnet_of_another_family_is_refused(
    controlnet: ControlNetExtension, engine: Engine
) -> None:
    units = controlnet.parse_args({"args": [unit()]}, field=FIELD)
    with pytest.raises(RequestError, match="sd1 ControlNet"):
        controlnet.prepare(context(engine, SDXL), units)


def test_prepare_gives_infotext_and_detected_map(
    controlnet: ControlNetExtension, engine: Engine
) -> None:
    units = controlnet.parse_args({"args": [unit(), unit(save_detected_map=False)]}, field=FIELD)
    effects = controlnet.prepare(context(engine), units)
    title = controlnet.models[0].title
    assert effects.infotext["ControlNet 0"] == (
        f"Module: canny, Model: {title}, Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, "
        "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"
    )
    assert "ControlNet 1" in effects.infotext
    assert len(effects.extra_images) == 1  # unit 1 does not save its map
    assert len(effects.unet_hooks) == len(effects.hires_unet_hooks) == 2


# --------------------------------------------------------------------------------------------
# Preprocessors and control image geometry


def test_canny_marks_the_border_of_a_square_only() -> None:
    edges = np.asarray(run_preprocessor(PREPROCESSORS["canny"], square(64), 64, 100, 200))
    on = edges[:, :, 0] > 0
    assert on.any()
    ys, xs = np.nonzero(on)
    # Every edge pixel lies within a pixel of the square's outline (rows/cols 15..16, 47..48).
    near_outline = (np.minimum(abs(ys - 15.5), abs(ys - 47.5)) <= 1) | (
        np.minimum(abs(xs - 15.5), abs(xs - 47.5)) <= 1
    )
    assert near_outline.all()
    assert not on[24:40, 24:40].any() and not on[:8].any()
    # All four sides are found.
    assert on[:, 14:18].any() and on[:, 46:50].any() and on[14:18].any() and on[46:50].any()


def test_canny_thresholds_decide() -> None:
    faint = square(64, lo=100, hi=110)  # a weak step: below 200 after Sobel
    edges = np.asarray(run_preprocessor(PREPROCESSORS["canny"], faint, 64, 100, 200))
    assert not edges.any()
    edges = np.asarray(run_preprocessor(PREPROCESSORS["canny"], faint, 64, 10, 20))
    assert edges.any()


def test_invert_and_threshold() -> None:
    image = square(64, lo=10, hi=200)
    inverted = np.asarray(run_preprocessor(PREPROCESSORS["invert"], image, 512, -1, -1))
    assert inverted[0, 0, 0] == 245 and inverted[32, 32, 0] == 55
    binary = np.asarray(run_preprocessor(PREPROCESSORS["threshold"], image, 64, 127, -1))
    assert binary[0, 0, 0] == 0 and binary[32, 32, 0] == 255
    assert set(np.unique(binary).tolist()) == {0, 255}


def test_control_map_resize_modes() -> None:
    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    assert fit_map(wide, 64, 64, 0).size == (64, 64)
    assert fit_map(wide, 64, 64, 1).size == (64, 64)
    filled = fit_map(wide, 64, 64, 2)
    assert filled.size == (64, 64)
    assert filled.getpixel((0, 0)) == (255, 0, 0)  # the median border colour fills the bands
    assert pixel_perfect_resolution((128, 64), 64, 64, 1) == 64
    assert pixel_perfect_resolution((128, 64), 64, 64, 2) == 32


# --------------------------------------------------------------------------------------------
# The hook on the tiny SD1 UNet


def _job(engine: Engine, hooks: list[Any], batch: int = 1) -> Job:
    sd1 = loaded(engine, SD1)
    gen = torch.Generator().manual_seed(0)
    dim = sd1.pipe.unet.config.cross_attention_dim
    uncond = CondPart(torch.randn(batch, 4, dim, generator=gen))
    cond = CondPart(torch.randn(batch, 4, dim, generator=gen))
    stage = Stage(
        unet=sd1.pipe.unet,
        schedule=lambda i: StepConditioning(uncond, (cond,)),
        discretization=Discretization.from_config(sd1.scheduler_config),
        hooks=tuple(hooks),
    )
    return Job(CFGDenoiser([stage], 7.0, 4), torch.randn(batch, 4, 8, 8, generator=gen))


@dataclass
class Job:
    """A 4-step Euler run of the tiny SD1 UNet through the engine's denoiser."""

    denoiser: CFGDenoiser
    latents: torch.Tensor


def denoise(job: Job) -> torch.Tensor:
    sigmas = job.denoiser.stage.discretization.get_sigmas(4)
    noise = Noise(lambda: torch.zeros_like(job.latents))
    with torch.no_grad():
        return sample_euler(job.denoiser, job.latents * sigmas[0], sigmas, noise, Options())


def _hook(controlnet: ControlNetExtension, **changes: Any) -> ControlNetHook:
    assert controlnet.cache is not None
    model = controlnet.cache.get(controlnet.models[0]).model
    values: dict[str, Any] = {
        "model": model,
        "control": image_tensor(square(64)),
        "weight": 1.0,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "control_mode": 0,
    }
    values.update(changes)
    return ControlNetHook(**values)


def test_residuals_change_the_result(controlnet: ControlNetExtension, engine: Engine) -> None:
    plain = denoise(_job(engine, []))
    controlled = denoise(_job(engine, [_hook(controlnet)]))
    assert not torch.allclose(plain, controlled)


def test_a_one_point_window_runs_where_the_extension_does(
    controlnet: ControlNetExtension, engine: Engine
) -> None:
    """The extension runs a unit while start <= state.sampling_step / sampling_steps <= end:
    over 4 Euler steps the ratios are 0, 0, 1/4, 2/4, so [0.5, 0.5] runs the last step and
    [0.3, 0.3] none."""
    plain = denoise(_job(engine, []))
    none = _hook(controlnet, guidance_start=0.3, guidance_end=0.3)
    assert torch.equal(plain, denoise(_job(engine, [none])))
    last = _hook(controlnet, guidance_start=0.5, guidance_end=0.5)
    assert not torch.allclose(plain, denoise(_job(engine, [last])))


@dataclass
class StepRecorder:
    """A UNet hook that adds nothing and records what each model call was told."""

    seen: list[tuple[int, int]]

    def __call__(self, x: Any, t: Any, kwargs: dict[str, Any], info: StepInfo) -> UNetExtras:
        self.seen.append((info.sampling_step, info.sampling_steps))
        return UNetExtras()


def _recorded(engine: Engine, sampler: Any, steps: int) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    job = _job(engine, [StepRecorder(seen)])
    job.denoiser.sampling_steps = steps
    sigmas = job.denoiser.stage.discretization.get_sigmas(steps)
    noise = Noise(lambda: torch.zeros_like(job.latents))
    with torch.no_grad():
        sampler(job.denoiser, job.latents * sigmas[0], sigmas, noise, Options())
    return seen


def test_hooks_see_webuis_sampling_step_per_sampler_step(engine: Engine) -> None:
    """webui's callback_state sets state.sampling_step = i after step i, so the model calls of
    step i see i - 1 (0 for the first two steps), and both Heun calls of a step see the same."""
    assert _recorded(engine, sample_euler, 6) == [(s, 6) for s in (0, 0, 1, 2, 3, 4)]
    # Heun: two calls per step except the last (to sigma 0).
    assert _recorded(engine, sample_heun, 4) == [(s, 4) for s in (0, 0, 0, 0, 1, 1, 2)]


@pytest.mark.parametrize(
    ("start", "end", "steps", "runs"),
    [
        (0.0, 0.5, 20, 12),  # ratios 0, 0, 1/20 ... 10/20: steps 0..11
        (0.5, 0.5, 20, 1),
        (0.0, 1.0, 20, 20),
        (0.2, 0.8, 10, 7),  # ratios 0, 0, .1, .2 ... .8: steps 3..9
        (0.9, 1.0, 10, 0),  # the ratio never passes 0.8 over 10 steps
    ],
)
def test_guidance_windows_count_steps_as_the_extension(
    engine: Engine, start: float, end: float, steps: int, runs: int
) -> None:
    infos = [
        StepInfo(i, steps, 1, 2, sampling_step=s, sampling_steps=n)
        for i, (s, n) in enumerate(_recorded(engine, sample_euler, steps))
    ]
    assert sum(active(info, start, end) for info in infos) == runs


def test_controlnet_is_more_important_leaves_the_negative_block_alone(
    controlnet: ControlNetExtension, engine: Engine
) -> None:
    sd1 = loaded(engine, SD1)
    unet = sd1.pipe.unet
    gen = torch.Generator().manual_seed(3)
    batch = 2
    model_in = torch.randn(2 * batch, 4, 8, 8, generator=gen)
    kwargs = {"encoder_hidden_states": torch.randn(2 * batch, 4, 64, generator=gen)}
    info = StepInfo(index=0, total=4, batch=batch, copies=2)
    t = torch.tensor(500)
    extras = _hook(controlnet, control_mode=2)(model_in, t, dict(kwargs), info)
    assert extras.down_block_additional_residuals is not None
    assert extras.mid_block_additional_residual is not None
    for residual in (*extras.down_block_additional_residuals, extras.mid_block_additional_residual):
        assert not residual[:batch].any() and residual[batch:].abs().sum() > 0
    with torch.no_grad():
        plain = unet(model_in, t, **kwargs).sample
        hooked = unet(
            model_in,
            t,
            down_block_additional_residuals=extras.down_block_additional_residuals,
            mid_block_additional_residual=extras.mid_block_additional_residual,
            **kwargs,
        ).sample
    assert torch.allclose(plain[:batch], hooked[:batch])
    assert not torch.allclose(plain[batch:], hooked[batch:])


def test_soft_scales() -> None:
    scales = soft_scales(1.0, 13)
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.825**12)
    assert len(soft_scales(0.5, 10)) == 10


# --------------------------------------------------------------------------------------------
# CFG rescale


@pytest.mark.parametrize(
    ("value", "phi"),
    [({"args": [0.7, False]}, 0.7), ({"args": [0.5]}, 0.5), ({"args": []}, 0.0), ([0], 0.0)],
)
def test_cfg_rescale_args(value: Any, phi: float) -> None:
    assert CFGRescaleExtension().parse_args(value, field="f") == RescaleArgs(phi)


@pytest.mark.parametrize("value", [{"args": [1.5]}, {"args": ["x"]}, {"args": [0.5, True]}])
def test_cfg_rescale_bad_args(value: Any) -> None:
    with pytest.raises(RequestError):
        CFGRescaleExtension().parse_args(value, field="f")


def test_cfg_rescale_changes_the_prediction_only_when_enabled(engine: Engine) -> None:
    ext = CFGRescaleExtension()
    ctx = context(engine)
    assert ext.prepare(ctx, RescaleArgs(0.0)).cfg_hooks == []
    effects = ext.prepare(ctx, RescaleArgs(0.7))
    assert effects.infotext == {"CFG Rescale": 0.7}
    plain = _job(engine, [])
    rescaled = _job(engine, [])
    rescaled.denoiser.cfg_hooks = tuple(effects.cfg_hooks)
    assert not torch.allclose(denoise(plain), denoise(rescaled))


def test_cfg_rescale_matches_the_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 1, 4, 8, 8, generator=gen)
    eps = uncond + 7 * (cond - uncond)
    out = rescale_cfg(eps, cond, 1.0)
    assert out.std().item() == pytest.approx(cond.std().item(), rel=1e-5)


def test_inpaint_hint_is_minus_one_under_the_mask(controlnet: ControlNetExtension) -> None:
    # Mikubill's "ControlNet inpaint protocol": hint = colour * (1 - m) - m, m = mask > 0.5,
    # applied after resizing to the pass's size.
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    control = torch.cat([image_tensor(square(64, lo=100, hi=200)), mask], dim=1)
    hook = _hook(controlnet, control=control)
    hint = hook._hint(torch.zeros(1, 4, 16, 16))  # a hires-sized pass: 128x128
    assert hint.shape == (1, 3, 128, 128)
    assert torch.all(hint[..., 40:88, 40:88] == -1.0)
    assert torch.allclose(hint[..., :16, :16], torch.full((1, 3, 16, 16), 100 / 255))


def test_inpaint_only_restore_keeps_the_control_latent_outside_the_mask(engine: Engine) -> None:
    # The implied clean image x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) equals the control
    # image's latent outside the mask and is untouched inside it (weight 1).
    from engine.sampling import encode_images
    from extensions.controlnet.inpaint_only import InpaintRestore

    sd1 = loaded(engine, SD1)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # inpaint the left half
    colour = square(64, lo=40, hi=220)
    alphas = sd1.pipe.scheduler.alphas_cumprod
    hook = InpaintRestore(sd1.pipe.vae, colour, mask, 1.0, alphas)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=gen)
    eps = torch.randn(1, 4, 8, 8, generator=gen)
    cond = StepConditioning(CondPart(torch.zeros(1, 1, 1)), ())
    info = StepInfo(0, 4, 1, 2, t=torch.tensor(500.0), sample=x_t)
    new = hook(eps, torch.cat([eps, eps]), cond, info)
    a, s = alphas[500].sqrt(), (1 - alphas[500]).sqrt()
    implied = (x_t - s * new) / a
    x0 = encode_images(sd1.pipe.vae, [colour])
    # Latent columns 0..4 touch the mask (max-pooled with a 10 px window): 5..7 are outside.
    assert torch.allclose(implied[..., 5:], x0[..., 5:], atol=1e-4)
    assert torch.equal(new[..., :4], eps[..., :4])
