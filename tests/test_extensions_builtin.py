"""webui's built-in always-on scripts in alwayson_scripts (Seed, Sampler, Refiner, Comments,
Hypertile, Extra options, Soft Inpainting), as webui 1.10's API treats them: accepted, the
UI-only ones' args ignored in favour of the request fields, with a warning saying what."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import pytest

from engine.api import Engine
from engine.errors import RequestError, UnknownName
from engine.extensions import ExtensionRegistry, GenerationContext

from .helpers import payload, pixels

REQUEST = SimpleNamespace(
    seed=1234,
    subseed=-1,
    subseed_strength=0.0,
    seed_resize_from_w=-1,
    seed_resize_from_h=-1,
    steps=4,
    sampler_name="Euler",
    scheduler=None,
    refiner_checkpoint=None,
    refiner_switch_at=None,
)


def warnings_for(name: str, value: Any, mode: str = "txt2img") -> list[str]:
    registry = ExtensionRegistry.discover()
    ((extension, args),) = registry.parse({name: value})
    ctx = GenerationContext(
        mode=cast(Any, mode),
        loaded=cast(Any, None),  # the built-in scripts never touch the model
        width=64,
        height=64,
        batch_size=1,
        steps=4,
        request=REQUEST,
    )
    effects = extension.prepare(ctx, args)
    assert not effects.unet_hooks and not effects.cfg_hooks and not effects.infotext
    return effects.warnings


# webui's payload display, with the values the request fields already have: nothing to say.
AGREEING: dict[str, Any] = {
    "Seed": {"args": [1234, False, -1, 0, 0, 0]},
    "Sampler": {"args": [4, "Euler", "Automatic"]},
    "Refiner": {"args": [False, "", 0.8]},
    "Comments": {"args": []},
    "Hypertile": {"args": []},
    "Extra options": {"args": []},
}


@pytest.mark.parametrize("name", sorted(AGREEING))
def test_builtin_script_agreeing_with_the_fields_is_accepted_silently(name: str) -> None:
    assert warnings_for(name, AGREEING[name]) == []
    assert warnings_for(name.upper(), {}) == []  # no args at all, any key case


@pytest.mark.parametrize(
    ("name", "args", "words"),
    [
        ("Seed", [5, False, -1, 0, 0, 0], ["seed=5", "seed=1234", "setup_for_ui_only"]),
        ("Seed", [1234, True, 77, 0.5, 0, 0], ["subseed=77", "subseed_strength=0.5"]),
        (
            "Sampler",
            [30, "DPM++ 2M", "Karras"],
            ["steps=30", "sampler_name='DPM++ 2M'", "scheduler='Karras'", "steps=4"],
        ),
        ("Refiner", [True, "tiny-sdxl", 0.5], ["refiner_checkpoint='tiny-sdxl'", "=None"]),
        ("Comments", [1], ["1 arg(s)", "takes no args"]),
        ("Hypertile", [True, 256], ["2 arg(s)", "hypertile_"]),
        ("Extra options", [0.5], ["override_settings"]),
    ],
)
def test_builtin_script_args_that_webui_ignores_are_named_in_a_warning(
    name: str, args: list[Any], words: list[str]
) -> None:
    (note,) = warnings_for(name, {"args": args})
    assert note.startswith(f"alwayson_scripts.{name}")
    for word in words:
        assert word in note


def test_seed_without_extra_ignores_the_variation_args_as_webui_ui_does() -> None:
    # The Seed script sets subseed only with "Extra" ticked and a strength above 0.
    assert warnings_for("Seed", {"args": [1234, False, 77, 0.5, 0, 0]}) == []


def test_soft_inpainting_enabled_is_reported_as_not_run() -> None:
    args = [True, 1, 0.5, 4, 0, 0.5, 2]
    (note,) = warnings_for("Soft Inpainting", {"args": args}, mode="img2img")
    assert "not supported" in note and "enabled=True" in note
    assert warnings_for("Soft Inpainting", {"args": [False, *args[1:]]}, mode="img2img") == []


def test_soft_inpainting_is_not_a_txt2img_script_as_in_webui() -> None:
    with pytest.raises(RequestError, match="img2img only"):
        warnings_for("Soft Inpainting", {"args": [False]})


def test_unknown_names_still_list_the_builtin_and_extension_titles() -> None:
    with pytest.raises(UnknownName) as err:
        ExtensionRegistry.discover().parse({"ADetailer": {"args": []}})
    for title in ("Seed", "Sampler", "Refiner", "Soft Inpainting", "ControlNet"):
        assert repr(title) in str(err.value)


def test_builtin_args_must_be_a_list() -> None:
    with pytest.raises(RequestError) as err:
        ExtensionRegistry.discover().parse({"Seed": {"args": 5}})
    assert err.value.problems[0].field == "alwayson_scripts.Seed.args"


def test_payload_display_scripts_change_no_pixel(engine: Engine) -> None:
    # A payload copied from webui with every built-in script listed: webui's API gives the
    # picture of the fields; so do we, bit for bit, and the ignored disagreement is reported.
    plain = engine.handle("auto", payload())
    scripts = {**AGREEING, "Sampler": {"args": [20, "DPM++ 2M", "Automatic"]}}
    copied = engine.handle("auto", payload(alwayson_scripts=scripts))
    assert pixels(copied.images[0].data).tobytes() == pixels(plain.images[0].data).tobytes()
    info = json.loads(copied.info)
    assert [w for w in info["warnings"] if w.startswith("alwayson_scripts.")] == [
        next(w for w in info["warnings"] if "alwayson_scripts.Sampler.args" in w)
    ]
