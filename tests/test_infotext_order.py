"""The order of webui's extra_generation_params, in `info` and in the infotext.

webui 1.10.1 prints the fixed keys of create_infotext's dict literal, then
`p.extra_generation_params` in insertion order (a key set again keeps its first place), and
`info` lists that dict as it is. Where each key is inserted (read from webui's source):

- extensions' `process` hooks (before everything below; sd-webui-controlnet moves its own to
  `before_process_batch` when the request names a refiner: process_has_sdxl_refiner);
- `p.init`: txt2img's hires keys (Denoising strength, Hires checkpoint, Hires sampler, Hires
  prompt, Hires negative prompt, Hires schedule type, Hires upscale/resize, Hires steps, Hires
  upscaler) or img2img's (Denoising strength, Mask mode, Mask blur, Inpaint area, Masked area
  padding, Masked content);
- extra_networks.activate: Lora hashes; setup_conds: TI hashes / Emphasis (sd_hijack_clip, in
  the order the forwards set them, negatives first);
- img2img's sample(): Noise multiplier; the sampler's get_sigmas (Discard penultimate sigma,
  Schedule type, Schedule min/max sigma, rho, Beta schedule alpha/beta) and initialize (Eta,
  Sigma churn/tmin/tmax/noise); the refiner's keys at its switch, during sampling.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from engine.api import Engine
from engine.infotext import FIXED_KEYS, param_pairs

from .helpers import CONTROLNET_UNIT, SDXL, b64_png, box_mask, card_image, payload, with_model

LORA = "<lora:tiny-lora-sd15:0.5>"
CONTROLNET = {"controlnet": {"args": [CONTROLNET_UNIT]}}
HIRES: dict[str, Any] = {
    "enable_hr": True,
    "hr_scale": 1.5,
    "hr_upscaler": "Latent",
    "denoising_strength": 0.5,
}


def _info(engine: Engine, endpoint: str, body: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(engine.handle(endpoint, body, lambda s, t: None).info)
    return info


def _printed_extras(infotext: str) -> list[str]:
    """The params line's keys after the fixed ones (webui prints those in its literal's order)."""
    keys = [key for key, _ in param_pairs(infotext.splitlines()[-1])]
    return [key for key in keys if key not in FIXED_KEYS and key != "Version"]


def _assert_order(info: dict[str, Any], expected: list[str]) -> None:
    assert list(info["extra_generation_params"]) == expected
    assert _printed_extras(info["infotexts"][0]) == [k for k in expected if k not in FIXED_KEYS]


def _short_hash(tiny_models_dir: Path, name: str) -> str:
    data = (tiny_models_dir / "embeddings" / f"{name}.safetensors").read_bytes()
    return hashlib.sha256(data).hexdigest()[:12]


def test_txt2img_extras_follow_webuis_insertion_order(engine: Engine) -> None:
    body = payload(
        prompt=f"a (lighthouse) {LORA}",
        negative_prompt="tiny-embedding",
        scheduler="Karras",
        hr_prompt="a castle",
        hr_scheduler="Exponential",
        hr_second_pass_steps=2,
        override_settings={"emphasis": "No norm", "s_noise": 0.9},
        alwayson_scripts=CONTROLNET,
        **HIRES,
    )
    _assert_order(
        _info(engine, "txt2img", body),
        [
            "ControlNet 0",  # process()
            "Denoising strength",  # p.init
            "Hires prompt",
            "Hires schedule type",
            "Hires upscale",
            "Hires steps",
            "Hires upscaler",
            "Lora hashes",  # extra_networks.activate
            "TI hashes",  # setup_conds: the negative's forward
            "Emphasis",  # the prompt's forward
            "Schedule type",  # get_sigmas
            "Sigma noise",  # initialize
        ],
    )


def test_a_named_refiner_moves_controlnet_after_the_init_keys_and_comes_last(
    engine: Engine,
) -> None:
    body = payload(
        prompt=f"a lighthouse {LORA}",
        refiner_checkpoint="tiny-sd15",
        refiner_switch_at=0.5,
        alwayson_scripts=CONTROLNET,
        **HIRES,
    )
    _assert_order(
        _info(engine, "txt2img", body),
        [
            "Denoising strength",
            "Hires upscale",
            "Hires upscaler",
            "ControlNet 0",  # before_process_batch
            "Lora hashes",
            "Refiner",  # at the switch, during sampling
            "Refiner switch at",
        ],
    )


def test_img2img_extras_follow_webuis_insertion_order(engine: Engine) -> None:
    body = payload(
        prompt=f"a lighthouse, tiny-embedding {LORA}",
        sampler_name="Euler a",
        scheduler="Beta",
        eta=0.5,
        init_images=[b64_png(card_image(64, 64))],
        mask=b64_png(box_mask(64, 64, (16, 16, 48, 48))),
        inpainting_mask_invert=1,
        inpaint_full_res=True,
        inpainting_fill=1,
        initial_noise_multiplier=0.9,
        denoising_strength=0.6,
        override_settings={"always_discard_next_to_last_sigma": True},
    )
    _assert_order(
        _info(engine, "img2img", body),
        [
            "Denoising strength",  # p.init
            "Mask mode",
            "Mask blur",
            "Inpaint area",
            "Masked area padding",
            "Lora hashes",
            "TI hashes",
            "Noise multiplier",  # img2img's sample()
            "Discard penultimate sigma",  # get_sigmas
            "Schedule type",
            "Beta schedule alpha",
            "Beta schedule beta",
            "Eta",  # initialize
        ],
    )


@pytest.mark.parametrize(
    ("negative", "prompt", "order"),
    [
        ("(ugly)", "a tiny-embedding", ["Emphasis", "TI hashes"]),
        ("tiny-embedding", "(a)", ["TI hashes", "Emphasis"]),
    ],
)
def test_emphasis_and_ti_hashes_come_in_the_order_the_encodings_set_them(
    engine: Engine, negative: str, prompt: str, order: list[str]
) -> None:
    """The negative prompts are encoded first (setup_conds: uc before c)."""
    body = payload(
        prompt=prompt, negative_prompt=negative, override_settings={"emphasis": "No norm"}
    )
    _assert_order(_info(engine, "txt2img", body), order)


def test_ti_hashes_repeat_as_webuis_forwards_write_them(
    engine: Engine, tiny_models_dir: Path
) -> None:
    """Each forward puts its own embeddings before the value so far: used in the negative and
    the prompt, an embedding is listed twice; SDXL's two text-encoder wrappers each run every
    forward. An embedding only the hires prompt uses is encoded during sampling, after
    webui copied the encodings' keys: not printed."""
    sd1 = _short_hash(tiny_models_dir, "tiny-embedding")
    both = _info(
        engine, "txt2img", payload(prompt="a tiny-embedding", negative_prompt="tiny-embedding")
    )
    assert (
        both["extra_generation_params"]["TI hashes"]
        == f"tiny-embedding: {sd1}, tiny-embedding: {sd1}"
    )
    assert f'TI hashes: "tiny-embedding: {sd1}, tiny-embedding: {sd1}"' in both["infotexts"][0]

    xl = _short_hash(tiny_models_dir, "tiny-embedding-sdxl")
    sdxl = _info(engine, "txt2img", with_model(SDXL, negative_prompt="tiny-embedding-sdxl"))
    expected = f"tiny-embedding-sdxl: {xl}, tiny-embedding-sdxl: {xl}"
    assert sdxl["extra_generation_params"]["TI hashes"] == expected

    hires_only = _info(engine, "txt2img", payload(hr_prompt="tiny-embedding", **HIRES))
    assert "TI hashes" not in hires_only["extra_generation_params"]
    assert "TI hashes" not in hires_only["infotexts"][0]


def test_info_lists_schedule_type_only_where_get_sigmas_sets_it(engine: Engine) -> None:
    """Euler's Automatic has no schedule function and DDIM samples on timesteps: webui's
    extra_generation_params has no "Schedule type" for them (the infotext still prints it)."""
    for sampler in ("Euler", "DDIM"):
        info = _info(engine, "txt2img", payload(sampler_name=sampler))
        assert "Schedule type" not in info["extra_generation_params"], sampler
        assert "Schedule type: " in info["infotexts"][0]
    karras = _info(engine, "txt2img", payload(sampler_name="DPM++ 2M"))
    assert karras["extra_generation_params"] == {"Schedule type": "Karras"}
