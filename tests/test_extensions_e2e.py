"""ControlNet and CFG Rescale through the engine, as webui clients send them."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from engine.api import Engine
from engine.errors import RequestError

from .helpers import assert_pixels_changed, b64_png, box_mask, card_image, payload, pixels

CARD = b64_png(card_image(64, 64))


def unit(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"module": "canny", "model": "tiny-controlnet-sd15", "image": CARD}
    base.update(changes)
    return base


def controlnet(*units: dict[str, Any], **changes: Any) -> str:
    return payload(alwayson_scripts={"controlnet": {"args": list(units)}}, **changes)


def run(engine: Engine, body: str) -> tuple[list[bytes], dict[str, Any], int]:
    steps: list[int] = []
    response = engine.handle("auto", body, lambda s, t: steps.append(s))
    return [i.data for i in response.images], json.loads(response.info), len(steps)


def test_controlnet_changes_the_image_and_leaves_nothing_attached(engine: Engine) -> None:
    plain, _, _ = run(engine, payload())
    images, info, _ = run(engine, controlnet(unit()))
    assert len(images) == 2  # the picture and the detected map, as webui returns them
    assert pixels(images[0]).tobytes() != pixels(plain[0]).tobytes()
    assert 'ControlNet 0: "Module: canny, Model: tiny-controlnet-sd15 [' in info["infotexts"][0]
    again, _, _ = run(engine, payload())
    assert again == plain


def test_guidance_windows_run_the_steps_the_extension_runs(engine: Engine) -> None:
    """The extension: start <= state.sampling_step / steps <= end. Over 4 txt2img steps the
    ratios are 0, 0, 1/4, 2/4: [0.3, 0.3] holds none (the plain picture), [0.25, 0.25] the
    third step (a ControlNet picture), which needs the pass' step count (4) to reach the
    hooks (with 5 the ratios would be 0, 0, .2, .4)."""
    plain, _, _ = run(engine, payload())
    images, _, _ = run(engine, controlnet(unit(guidance_start=0.3, guidance_end=0.3)))
    assert pixels(images[0]).tobytes() == pixels(plain[0]).tobytes()
    images, _, _ = run(engine, controlnet(unit(guidance_start=0.25, guidance_end=0.25)))
    assert_pixels_changed(images[:1], plain[:1])


def test_detected_map_only_when_asked(engine: Engine) -> None:
    images, info, _ = run(engine, controlnet(unit(save_detected_map=False)))
    assert len(images) == 1 and len(info["infotexts"]) == 1


def test_two_units_and_value_forms(engine: Engine) -> None:
    one, _, _ = run(engine, controlnet(unit(save_detected_map=False)))
    two, info, _ = run(
        engine,
        controlnet(
            unit(save_detected_map=False),
            unit(
                module="invert", weight=0.5, resize_mode=0, control_mode=2, save_detected_map=False
            ),
        ),
    )
    assert pixels(two[0]).tobytes() != pixels(one[0]).tobytes()
    assert "ControlNet 1: " in info["infotexts"][0]
    as_strings, _, _ = run(
        engine,
        controlnet(
            unit(save_detected_map=False),
            unit(
                module="invert",
                weight=0.5,
                resize_mode="Just Resize",
                control_mode="ControlNet is more important",
                save_detected_map=False,
            ),
        ),
    )
    assert as_strings == two


def test_img2img_falls_back_to_the_init_image(engine: Engine) -> None:
    body = controlnet(
        unit(image=None, save_detected_map=False), init_images=[CARD], denoising_strength=0.6
    )
    images, info, _ = run(engine, body)
    assert len(images) == 1 and "ControlNet 0" in info["infotexts"][0]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            payload(alwayson_scripts={"NoSuchExtension": {"args": []}}),
            ["alwayson_scripts", "ControlNet"],
        ),
        (controlnet(unit(model="no-such-model")), ["no-such-model", "tiny-controlnet-sd15"]),
        (controlnet(unit(module="depth_midas")), ["depth_midas", "canny"]),
        (controlnet(unit(module="no_such_module")), ["no_such_module", "canny"]),
        (controlnet(unit(image=None)), ["no input image"]),
    ],
)
def test_extension_errors_come_before_any_generation(
    engine: Engine, body: str, words: list[str]
) -> None:
    steps: list[int] = []
    with pytest.raises(RequestError) as err:
        engine.handle("auto", body, lambda s, t: steps.append(s))
    for word in words:
        assert word in str(err.value)
    assert steps == []


@pytest.mark.parametrize(
    "keys",
    [
        ["controlnet", "ControlNet"],
        ["controlnet", " controlnet ", "CONTROLNET"],
        ["CFG Rescale Extension", "cfg rescale extension"],
    ],
)
def test_two_keys_naming_one_extension_are_refused_naming_both(
    engine: Engine, keys: list[str]
) -> None:
    # Issue 16: four spellings of "controlnet" ran 12 units against a limit of 3.
    value = {"args": [unit()]} if "controlnet" in keys[0].lower() else {"args": [0.5]}
    steps: list[int] = []
    with pytest.raises(RequestError) as err:
        engine.handle(
            "auto",
            payload(alwayson_scripts={key: value for key in keys}),
            lambda s, t: steps.append(s),
        )
    problem = next(p for p in err.value.problems if p.field == "alwayson_scripts")
    assert problem.value == keys
    for key in keys:
        assert repr(key) in str(err.value)
    assert steps == []


def test_cfg_rescale_changes_the_image_only_when_enabled(engine: Engine) -> None:
    plain, _, _ = run(engine, payload())
    off, _, _ = run(engine, payload(alwayson_scripts={"CFG Rescale Extension": {"args": [0]}}))
    on, info, _ = run(engine, payload(alwayson_scripts={"cfg rescale extension": {"args": [0.7]}}))
    assert off == plain
    assert pixels(on[0]).tobytes() != pixels(plain[0]).tobytes()
    assert "CFG Rescale: 0.7" in info["infotexts"][0]


@pytest.mark.parametrize("endpoint", ["controlnet/model_list", "controlnet/module_list"])
def test_controlnet_listings(engine: Engine, endpoint: str) -> None:
    listing = engine.handle(endpoint, "{}").listing
    if endpoint.endswith("model_list"):
        assert listing["model_list"][0].startswith("tiny-controlnet-sd15 [")
    else:
        assert "canny" in listing["module_list"]


@pytest.mark.parametrize(
    "changes",
    [
        {"enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.5},
        {
            "init_images": [CARD],
            "mask": b64_png(box_mask(64, 64, (8, 8, 40, 40))),
            "denoising_strength": 0.8,
        },
    ],
)
def test_controlnet_with_hires_and_inpainting(engine: Engine, changes: dict[str, Any]) -> None:
    plain, _, _ = run(engine, payload(**changes))
    images, info, _ = run(engine, controlnet(unit(save_detected_map=False), **changes))
    assert len(images) == 1 and "ControlNet 0" in info["infotexts"][0]
    assert pixels(images[0]).tobytes() != pixels(plain[0]).tobytes()


def test_sdxl_controlnet(engine: Engine) -> None:
    model = {"sd_model_checkpoint": "tiny-sdxl"}
    plain, _, _ = run(engine, payload(override_settings=model))
    images, info, _ = run(
        engine,
        controlnet(
            unit(model="tiny-controlnet-sdxl", save_detected_map=False), override_settings=model
        ),
    )
    assert pixels(images[0]).tobytes() != pixels(plain[0]).tobytes()
    assert "Model: tiny-controlnet-sdxl [" in info["infotexts"][0]
    with pytest.raises(RequestError, match="tiny-controlnet-sdxl"):
        run(engine, controlnet(unit(model="tiny-controlnet-sdxl")))  # an SDXL ControlNet on SD1


# --------------------------------------------------------------------------------------------
# Forms real clients send (issue 10): "" images, padded unit lists, inpaint modules

MASK = b64_png(box_mask(64, 64, (16, 16, 47, 47)))
IMG2IMG: dict[str, Any] = {"init_images": [CARD], "denoising_strength": 0.6}


def mean_difference(a: bytes, b: bytes) -> float:
    left = np.asarray(pixels(a), dtype=np.float32)
    right = np.asarray(pixels(b), dtype=np.float32)
    return float(np.abs(left - right).mean())


@pytest.mark.parametrize("empty", ["", None, {"image": "", "mask": ""}])
def test_an_empty_image_means_none(engine: Engine, empty: Any) -> None:
    # webuiapi sends "image": "" for a unit without an image.
    omitted = unit(save_detected_map=False)
    del omitted["image"]
    expected, _, _ = run(engine, controlnet(omitted, **IMG2IMG))
    images, info, _ = run(engine, controlnet(unit(image=empty, save_detected_map=False), **IMG2IMG))
    assert images == expected and "ControlNet 0" in info["infotexts"][0]
    with pytest.raises(RequestError, match="no input image is given") as err:
        engine.handle("auto", controlnet(unit(image=empty)))
    assert err.value.problems[0].field == "alwayson_scripts.controlnet.args[0].image"


def test_disabled_units_beyond_the_limit_are_accepted(engine: Engine) -> None:
    # Clients pad the list to their unit count; webui takes the first 3 and these are off.
    one, _, _ = run(engine, controlnet(unit(save_detected_map=False)))
    padded = [unit(save_detected_map=False)] + [unit(enabled=False, image="")] * 5
    images, _, _ = run(engine, controlnet(*padded))
    assert images == one


def test_inpaint_global_harmonious_masks_the_hint(engine: Engine) -> None:
    plain, _, _ = run(engine, payload())
    unmasked, _, _ = run(engine, controlnet(unit(module="inpaint", save_detected_map=False)))
    masked, info, _ = run(
        engine,
        controlnet(unit(module="inpaint_global_harmonious", mask=MASK)),
    )
    assert "Module: inpaint," in info["infotexts"][0]
    # The hint is -1 inside the mask instead of the picture. The tiny random ControlNet moves
    # pixels only a little (about 0.5 grey levels on average here); identical would be 0.
    assert mean_difference(masked[0], unmasked[0]) > 0.1
    assert mean_difference(masked[0], plain[0]) > 0.1
    detected = np.asarray(pixels(masked[1]))
    assert (detected[20:44, 20:44] == 0).all() and detected[:8].any()  # black where masked


def test_inpaint_only_with_img2img_inpainting_runs_as_global_harmonious(engine: Engine) -> None:
    body = {**IMG2IMG, "mask": MASK}
    harmonious, _, _ = run(
        engine, controlnet(unit(module="inpaint", image=None, save_detected_map=False), **body)
    )
    only, info, _ = run(
        engine,
        controlnet(unit(module="inpaint_only", image=None, save_detected_map=False), **body),
    )
    assert only == harmonious
    assert any("runs as inpaint_global_harmonious" in w for w in info["warnings"])
    plain, _, _ = run(engine, payload(**body))
    assert mean_difference(only[0], plain[0]) > 0.1  # see the test above for the scale


@pytest.mark.parametrize(
    ("module", "words"),
    [
        ("inpaint_only+lama", ["inpaint_only+lama", "needs model weights"]),
        ("tile_colorfix", ["tile_colorfix", "needs model weights"]),
    ],
)
def test_unsupported_inpaint_forms_are_clear_errors(
    engine: Engine, module: str, words: list[str]
) -> None:
    with pytest.raises(RequestError) as err:
        engine.handle("auto", controlnet(unit(module=module, mask=MASK)))
    assert err.value.problems[0].field == "alwayson_scripts.controlnet.args[0].module"
    for word in words:
        assert word in str(err.value)


def test_inpaint_only_in_txt2img_keeps_the_control_image_outside_the_mask(engine: Engine) -> None:
    # The extension's own txt2img inpaint example: image and mask in the unit.
    card = np.asarray(card_image(64, 64), dtype=np.float32)
    sent = unit(module="inpaint_only", image={"image": CARD, "mask": MASK})
    images, info, _ = run(engine, controlnet(sent))
    assert "Module: inpaint_only," in info["infotexts"][0]
    out = np.asarray(pixels(images[0]), dtype=np.float32)
    # Mask 16..47, dilated and blurred by 7 px: from row/col 10 to 53 the picture shows through;
    # outside that band the control image comes back (to within rounding).
    outside = np.ones((64, 64), dtype=bool)
    outside[9:55, 9:55] = False
    assert np.abs(out[outside] - card[outside]).max() <= 1.0
    # Inside the mask the picture is generated: far from the card (mean > 10 grey levels).
    assert np.abs(out[20:44, 20:44] - card[20:44, 20:44]).mean() > 10
    harmonious, _, _ = run(engine, controlnet({**sent, "module": "inpaint"}))
    assert mean_difference(images[0], harmonious[0]) > 1.0  # the restore and the composite


def test_high_res_only_without_a_hires_pass_runs_like_both(engine: Engine) -> None:
    # Mikubill: hr_option counts only with high-res fix (`... if high_res_fix else BOTH`).
    both, _, _ = run(engine, controlnet(unit(save_detected_map=False)))
    high, _, _ = run(engine, controlnet(unit(save_detected_map=False, hr_option="High res only")))
    assert pixels(high[0]).tobytes() == pixels(both[0]).tobytes()
    plain, _, _ = run(engine, payload())
    assert pixels(high[0]).tobytes() != pixels(plain[0]).tobytes()
