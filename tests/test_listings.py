"""Listing endpoints and png-info at engine level: webui 1.10.1's response shapes and content.

The expected shapes below are written from webui's `modules/api/models.py` (v1.10.1) by hand,
class by class, NOT taken from engine/listings.py: each names its webui class. A field
declared `Optional[...]` there may be null; webui's FastAPI answers through these pydantic v1
models, so every field is present in every item.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.api import ENDPOINTS, Engine
from engine.errors import RequestError
from engine.infotext import parse_generation_parameters

from .helpers import SD1, card_image, payload, pixels

NoneType = type(None)
Shape = dict[str, tuple[type, ...]]

# Field -> allowed JSON types, per webui 1.10.1 modules/api/models.py class.
UPSCALER_ITEM: Shape = {  # class UpscalerItem
    "name": (str,),
    "model_name": (str, NoneType),
    "model_path": (str, NoneType),
    "model_url": (str, NoneType),
    "scale": (float, NoneType),
}
LATENT_UPSCALER_MODE_ITEM: Shape = {"name": (str,)}  # class LatentUpscalerModeItem
SD_MODEL_ITEM: Shape = {  # class SDModelItem
    "title": (str,),
    "model_name": (str,),
    "hash": (str, NoneType),
    "sha256": (str, NoneType),
    "filename": (str,),
    "config": (str, NoneType),
}
SD_VAE_ITEM: Shape = {"model_name": (str,), "filename": (str,)}  # class SDVaeItem
# Forge's sd-modules items (webui 1.10.1 has no such route): model_name, filename.
SD_MODULE_ITEM: Shape = {"model_name": (str,), "filename": (str,)}
SAMPLER_ITEM: Shape = {"name": (str,), "aliases": (list,), "options": (dict,)}  # class SamplerItem
SCHEDULER_ITEM: Shape = {  # class SchedulerItem
    "name": (str,),
    "label": (str,),
    "aliases": (list, NoneType),
    "default_rho": (float, NoneType),
    "need_inner_model": (bool, NoneType),
}
# extensions-builtin/Lora/scripts/lora_script.py create_lora_json (no response model).
LORA_ITEM: Shape = {"name": (str,), "alias": (str,), "path": (str,), "metadata": (dict,)}
HYPERNETWORK_ITEM: Shape = {"name": (str,), "path": (str, NoneType)}  # class HypernetworkItem
FACE_RESTORER_ITEM: Shape = {"name": (str,), "cmd_dir": (str, NoneType)}  # class FaceRestorerItem
# class RealesrganItem
REALESRGAN_ITEM: Shape = {"name": (str,), "path": (str, NoneType), "scale": (int, NoneType)}
PROMPT_STYLE_ITEM: Shape = {  # class PromptStyleItem
    "name": (str,),
    "prompt": (str, NoneType),
    "negative_prompt": (str, NoneType),
}
EMBEDDING_ITEM: Shape = {  # class EmbeddingItem
    "step": (int, NoneType),
    "sd_checkpoint": (str, NoneType),
    "sd_checkpoint_name": (str, NoneType),
    "shape": (int,),
    "vectors": (int,),
}
EMBEDDINGS_RESPONSE: Shape = {"loaded": (dict,), "skipped": (dict,)}  # class EmbeddingsResponse
MEMORY_RESPONSE: Shape = {"ram": (dict,), "cuda": (dict,)}  # class MemoryResponse
PNG_INFO_RESPONSE: Shape = {
    "info": (str,),
    "items": (dict,),
    "parameters": (dict,),
}  # PNGInfoResponse

# Endpoints answering a list of items of one shape.
LIST_SHAPES: dict[str, Shape] = {
    "upscalers": UPSCALER_ITEM,
    "latent-upscale-modes": LATENT_UPSCALER_MODE_ITEM,
    "sd-models": SD_MODEL_ITEM,
    "sd-vae": SD_VAE_ITEM,
    "sd-modules": SD_MODULE_ITEM,
    "samplers": SAMPLER_ITEM,
    "schedulers": SCHEDULER_ITEM,
    "loras": LORA_ITEM,
    "hypernetworks": HYPERNETWORK_ITEM,
    "face-restorers": FACE_RESTORER_ITEM,
    "realesrgan-models": REALESRGAN_ITEM,
    "prompt-styles": PROMPT_STYLE_ITEM,
}
# Every listing a webui client calls at start-up (issue 10), and png-info.
CLIENT_LISTINGS = (
    *LIST_SHAPES,
    "embeddings",
    "options",
    "cmd-flags",
    "memory",
    "png-info",
)


def assert_shape(item: Any, shape: Shape, where: str) -> None:
    assert isinstance(item, dict), f"{where}: {item!r} is not an object"
    assert set(item) == set(shape), f"{where}: keys {sorted(item)} != webui's {sorted(shape)}"
    for key, types in shape.items():
        value = item[key]
        # JSON has no int/bool confusion: a bool is never a number field's value.
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        assert ok, f"{where}.{key}: {value!r} is not {types}"


def listing(engine: Engine, name: str, api_json: str = "{}") -> Any:
    # Through JSON, as a client receives it.
    return json.loads(json.dumps(engine.handle(name, api_json).listing))


def png_b64(engine: Engine, body: str) -> str:
    return base64.b64encode(engine.handle("txt2img", body).images[0].data).decode()


def test_every_client_listing_is_an_endpoint() -> None:
    assert set(CLIENT_LISTINGS) <= set(ENDPOINTS)


@pytest.mark.parametrize("name", sorted(LIST_SHAPES))
def test_list_listing_items_have_webuis_fields(engine: Engine, name: str) -> None:
    items = listing(engine, name)
    assert isinstance(items, list)
    for index, item in enumerate(items):
        assert_shape(item, LIST_SHAPES[name], f"{name}[{index}]")


def test_upscalers_are_webuis_builtins_and_latent_modes_are_their_own_listing(
    engine: Engine,
) -> None:
    # webui 1.10.1 lists UpscalerNone, Lanczos and Nearest (scale 4, no model) first (the
    # upscalers/ files follow: tests/test_upscalers.py); the latent modes are only in
    # latent-upscale-modes, in shared.latent_upscale_modes order.
    assert listing(engine, "upscalers")[:3] == [
        {"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
        for n in ("None", "Lanczos", "Nearest")
    ]
    assert [m["name"] for m in listing(engine, "latent-upscale-modes")] == [
        "Latent",
        "Latent (antialiased)",
        "Latent (bicubic)",
        "Latent (bicubic antialiased)",
        "Latent (nearest)",
        "Latent (nearest-exact)",
    ]


def test_every_listed_upscaler_and_latent_mode_is_accepted_as_hr_upscaler(engine: Engine) -> None:
    names = [u["name"] for u in listing(engine, "upscalers")]
    names += [m["name"] for m in listing(engine, "latent-upscale-modes")]
    for name in names:
        body = payload(enable_hr=True, hr_scale=1.25, hr_upscaler=name, steps=1, width=64)
        assert engine.handle("txt2img", body).images, name


def test_sampler_options_are_strings_as_webui_sends_them(engine: Engine) -> None:
    # SamplerItem.options is dict[str, str]: pydantic v1 sends True as "True".
    samplers = {s["name"]: s for s in listing(engine, "samplers")}
    assert samplers["DPM++ SDE"]["options"] == {
        "scheduler": "karras",
        "second_order": "True",
        "brownian_noise": "True",
    }
    assert "k_euler_a" in samplers["Euler a"]["aliases"]
    assert all(isinstance(v, str) for s in samplers.values() for v in s["options"].values())


def test_sd_modules_list_the_vae_files(engine: Engine) -> None:
    assert [m["model_name"] for m in listing(engine, "sd-modules")] == ["tiny-vae.safetensors"]


def test_embeddings_are_loaded_or_skipped_by_the_default_checkpoints_width(
    engine: Engine,
) -> None:
    data = listing(engine, "embeddings")
    assert_shape(data, EMBEDDINGS_RESPONSE, "embeddings")
    for part in ("loaded", "skipped"):
        for name, item in data[part].items():
            assert_shape(item, EMBEDDING_ITEM, f"embeddings.{part}.{name}")
    # The default checkpoint is SD1: the SDXL pair (clip_l + clip_g) does not fit it, as in
    # webui, whose SDXL embedding shape is the two widths added.
    assert list(data["loaded"]) == ["tiny-embedding"]
    assert list(data["skipped"]) == ["tiny-embedding-sdxl"]
    sdxl = data["skipped"]["tiny-embedding-sdxl"]
    assert sdxl["shape"] > data["loaded"]["tiny-embedding"]["shape"]
    assert data["loaded"]["tiny-embedding"]["vectors"] >= 1


def test_webui_pt_embedding_lists_its_training_step_and_checkpoint(tmp_path: Path) -> None:
    import torch

    from engine.embeddings import EmbeddingCatalog

    path = tmp_path / "trained.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.zeros(3, 8)},
            "name": "trained",
            "step": 1500,
            "sd_checkpoint": "6ce0161689",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        path,
    )
    data = EmbeddingCatalog.scan([path]).listing(expected_shape=8)
    assert data == {
        "loaded": {
            "trained": {
                "step": 1500,
                "sd_checkpoint": "6ce0161689",
                "sd_checkpoint_name": "v1-5-pruned-emaonly",
                "shape": 8,
                "vectors": 3,
            }
        },
        "skipped": {},
    }
    assert list(EmbeddingCatalog.scan([path]).listing(expected_shape=768)["skipped"]) == ["trained"]


def test_empty_listings_where_this_server_has_none(engine: Engine) -> None:
    for name in ("hypernetworks", "face-restorers", "prompt-styles"):
        assert listing(engine, name) == [], name


# ---------------------------------------------------------------------------------- options

# webui 1.10.1 modules/shared_options.py defaults, for the options override_settings takes here.
WEBUI_OPTION_DEFAULTS = {
    "CLIP_stop_at_last_layers": 1,
    "sd_vae": "Automatic",
    "eta_noise_seed_delta": 0,
    "randn_source": "GPU",
    "emphasis": "Original",
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "samples_format": "png",
    "jpeg_quality": 80,
    "enable_pnginfo": True,
    "add_model_hash_to_info": True,
    "add_model_name_to_info": True,
    "add_version_to_infotext": True,
    "comma_padding_backtrack": 20,
    "img2img_fix_steps": False,
    "initial_noise_multiplier": 1.0,
    "inpainting_mask_weight": 1.0,
    "upscaler_for_img2img": None,
}


def test_options_are_the_effective_defaults_under_webuis_names(engine: Engine) -> None:
    options = listing(engine, "options")
    default = listing(engine, "sd-models")[0]
    assert options["sd_model_checkpoint"] == default["title"] == f"{SD1} [{default['hash']}]"
    assert options["sd_checkpoint_hash"] == default["sha256"]
    for key, value in WEBUI_OPTION_DEFAULTS.items():
        assert key in options, key
        assert options[key] == value and type(options[key]) is type(value), (key, options[key])


def test_sending_the_listed_options_back_changes_nothing(engine: Engine) -> None:
    # "Effective defaults": a request that sets every listed option to the listed value gets
    # the picture of a request without override_settings.
    settings = {k: v for k, v in listing(engine, "options").items() if k != "sd_checkpoint_hash"}
    plain = engine.handle("txt2img", payload()).images[0].data
    echoed = engine.handle("txt2img", payload(override_settings=settings)).images[0].data
    assert pixels(echoed).tobytes() == pixels(plain).tobytes()


def test_options_cannot_be_set_here(engine: Engine) -> None:
    # webui's POST /sdapi/v1/options changes later requests; here nothing outlives a request,
    # so options sent to the options endpoint are refused (not silently listed back).
    assert listing(engine, "options", "")["CLIP_stop_at_last_layers"] == 1
    with pytest.raises(RequestError) as err:
        engine.handle("options", json.dumps({"CLIP_stop_at_last_layers": 2}))
    assert err.value.problems[0].field == "api_json"
    assert "override_settings" in str(err.value)
    assert listing(engine, "options")["CLIP_stop_at_last_layers"] == 1


def test_cmd_flags_is_a_small_honest_object(engine: Engine, tiny_models_dir: Path) -> None:
    flags = listing(engine, "cmd-flags")
    assert flags["api"] is True and flags["nowebui"] is True
    assert Path(flags["ckpt_dir"]) == tiny_models_dir / "checkpoints"
    assert Path(flags["lora_dir"]).is_dir() and Path(flags["embeddings_dir"]).is_dir()
    assert flags["no_half"] is True  # CPU: float32
    assert flags["use_cpu"] == ["all"]
    assert len(flags) < 20


def test_memory_in_webuis_shape_with_cuda_unavailable_on_cpu(engine: Engine) -> None:
    memory = listing(engine, "memory")
    assert_shape(memory, MEMORY_RESPONSE, "memory")
    ram = memory["ram"]
    assert set(ram) == {"free", "used", "total"}
    assert 0 < ram["used"] < ram["total"] and ram["free"] == ram["total"] - ram["used"]
    assert memory["cuda"] == {"error": "unavailable"}


# --------------------------------------------------------------------------------- png-info


def test_png_info_round_trip_gives_the_requests_values(engine: Engine) -> None:
    request = json.loads(payload(cfg_scale=6.5, width=72, height=64, seed=4321))
    request["prompt"] = "a (lighthouse:1.2) on a cliff, night"
    info = listing(engine, "png-info", json.dumps({"image": png_b64(engine, json.dumps(request))}))
    assert_shape(info, PNG_INFO_RESPONSE, "png-info")
    params = info["parameters"]
    assert params["Prompt"] == request["prompt"]
    assert params["Negative prompt"] == request["negative_prompt"]
    assert params["Steps"] == str(request["steps"])
    assert params["Sampler"] == request["sampler_name"]
    assert float(params["CFG scale"]) == request["cfg_scale"]
    assert params["Seed"] == str(request["seed"])
    assert (params["Size-1"], params["Size-2"]) == ("72", "64")
    assert "Size" not in params  # webui keeps only the split
    assert params["Emphasis"] == "Original"  # the prompt uses weights
    assert info["info"].startswith(request["prompt"] + "\nNegative prompt: blurry\nSteps: 4")
    assert info["items"] == {}


def test_png_info_reads_the_exif_comment_of_jpeg_and_webp(engine: Engine) -> None:
    for fmt in ("jpg", "webp"):
        body = payload(override_settings={"samples_format": fmt}, seed=77)
        info = listing(engine, "png-info", json.dumps({"image": png_b64(engine, body)}))
        assert info["parameters"]["Seed"] == "77", fmt
        assert info["parameters"]["Prompt"] == "a lighthouse on a cliff", fmt


def test_png_info_of_a_jpeg_with_a_broken_exif_block_has_no_infotext(engine: Engine) -> None:
    # webui reads a failing EXIF block as no comment; PIL raises SyntaxError on it.
    buffer = io.BytesIO()
    card_image(32, 32).save(buffer, format="JPEG", exif=b"Exif\0\0" + bytes(range(256))[::-1])
    body = {"image": base64.b64encode(buffer.getvalue()).decode()}
    info = listing(engine, "png-info", json.dumps(body))
    assert info["info"] == ""
    assert info["parameters"]["Prompt"] == ""  # parsed with webui's defaults, as without EXIF


def test_png_info_data_url_and_other_text_chunks(engine: Engine) -> None:
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler a, Size: 512x768, Seed: 1")
    meta.add_text("Software", "painter")
    buffer = io.BytesIO()
    card_image(32, 32).save(buffer, format="PNG", pnginfo=meta, dpi=(72, 72))
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    info = listing(engine, "png-info", json.dumps({"image": url}))
    assert info["items"] == {"Software": "painter"}  # dpi is one of webui's ignored keys
    assert info["parameters"]["Sampler"] == "Euler a"
    assert (info["parameters"]["Size-1"], info["parameters"]["Size-2"]) == ("512", "768")


def test_png_info_of_an_image_without_infotext(engine: Engine) -> None:
    buffer = io.BytesIO()
    card_image(16, 16).save(buffer, format="PNG")
    info = listing(
        engine, "png-info", json.dumps({"image": base64.b64encode(buffer.getvalue()).decode()})
    )
    # webui: geninfo None -> "", parsed with its defaults.
    assert info["info"] == "" and info["items"] == {}
    assert info["parameters"]["Prompt"] == "" and info["parameters"]["Clip skip"] == "1"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("{}", "required"),
        ('{"image": ""}', "required"),
        ('{"image": null}', "required"),
        ('{"image": "not base64 at all!"}', "base64"),
        ('{"image": 5}', "base64 string"),
        ('{"image": "https://example.com/a.png"}', "does not fetch"),
        ('{"image": "' + base64.b64encode(b"GIF89a" + bytes(20)).decode() + '"}', "gif"),
    ],
)
def test_png_info_refuses_a_missing_or_bad_image_naming_the_field(
    engine: Engine, body: str, expected: str
) -> None:
    with pytest.raises(RequestError) as err:
        engine.handle("png-info", body)
    problem = err.value.problems[0]
    assert problem.field == "image"
    assert expected.lower() in str(err.value).lower(), str(err.value)
    assert "PNG" in str(err.value)  # what is allowed


def test_png_info_refuses_bad_api_json(engine: Engine) -> None:
    with pytest.raises(RequestError) as err:
        engine.handle("png-info", "[1]")
    assert err.value.problems[0].field == "api_json"


# ---------------------------------------- parse_generation_parameters (webui's, by example)

WEBUI_TEXT = (
    "masterpiece, (best quality:1.2), 1girl\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3697412856, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.4, "
    'Clip skip: 2, Hires prompt: "masterpiece, (best quality:1.2), 1girl", Hires upscale: 2, '
    'Hires upscaler: R-ESRGAN 4x+, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1'
)


def test_parse_generation_parameters_on_a_real_webui_infotext() -> None:
    # Worked through webui 1.10.1's parse_generation_parameters by hand (no styles).
    assert parse_generation_parameters(WEBUI_TEXT) == {
        "Steps": "28",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7",
        "Seed": "3697412856",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": "0.4",
        "Clip skip": "2",
        "Hires prompt": "",  # the same as the prompt: webui empties it
        "Hires upscale": "2",
        "Hires upscaler": "R-ESRGAN 4x+",
        "Lora hashes": "add_detail: 7c6bad76eb54",
        "Version": "v1.10.1",
        "Hires negative prompt": "",
        "Prompt": "masterpiece, (best quality:1.2), 1girl",
        "Negative prompt": "lowres, bad anatomy",
        "Hires resize-1": 0,
        "Hires resize-2": 0,
        "Hires sampler": "Use same sampler",
        "Hires schedule type": "Use same scheduler",
        "Hires checkpoint": "Use same checkpoint",
        "Mask mode": "Inpaint masked",
        "Masked content": "original",
        "Inpaint area": "Whole picture",
        "Masked area padding": 32,
        "RNG": "GPU",
        "Schedule max sigma": 0,
        "Schedule min sigma": 0,
        "Schedule rho": 0,
        "VAE Encoder": "Full",
        "VAE Decoder": "Full",
        "FP8 weight": "Disable",
        "Emphasis": "Original",
        "Refiner switch by sampling steps": False,
    }


def test_parse_generation_parameters_old_infotexts() -> None:
    # An old (1.5) infotext: First pass size converts, and the back-compat flags are set.
    old = (
        "a [cat:dog:0.5]\n"
        "Steps: 20, Sampler: DDIM, Size: 1024x1024, First pass size: 0x0, Version: v1.5.1"
    )
    res = parse_generation_parameters(old)
    assert (res["Size-1"], res["Size-2"]) == (512, 512)  # old_hires_fix_first_pass_dimensions
    assert (res["Hires resize-1"], res["Hires resize-2"]) == (1024, 1024)
    assert res["Old prompt editing timelines"] is True
    assert res["Pad conds v0"] is True
    assert res["Downcast alphas_cumprod"] is True
    # webui's attention parser reads the editing brackets as [de-emphasis]:
    assert res["Emphasis"] == "Original"
    # Two pairs only on the last line: it is prompt text, not parameters (webui needs 3).
    res = parse_generation_parameters("a cat\nSteps: 20, Seed: 1")
    assert res["Prompt"] == "a cat\nSteps: 20, Seed: 1" and "Steps" not in res


def test_embedding_files_we_cannot_read_are_not_listed(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from engine.embeddings import EmbeddingCatalog

    good = tmp_path / "good.safetensors"
    save_file({"emb_params": torch.zeros(2, 8)}, str(good))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    catalog = EmbeddingCatalog.scan([good, broken])
    assert "broken" in catalog.skipped  # the reason, for the setup log
    assert catalog.listing(expected_shape=8) == {
        "loaded": {
            "good": {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": 8,
                "vectors": 2,
            }
        },
        "skipped": {},
    }


@pytest.mark.gpu
def test_memory_cuda_fields_in_webuis_shape_on_cuda(engine: Engine) -> None:
    if engine.models.cache.placement.device != "cuda":
        pytest.skip("the engine runs on CPU: cuda is {'error': 'unavailable'} (tested above)")
    cuda = listing(engine, "memory")["cuda"]
    # webui's get_memory: system free/used/total, torch's allocator counters, events.
    assert set(cuda) == {"system", "active", "allocated", "reserved", "inactive", "events"}
    assert set(cuda["system"]) == {"free", "used", "total"}
    for key in ("active", "allocated", "reserved", "inactive"):
        assert set(cuda[key]) == {"current", "peak"}, key
    assert set(cuda["events"]) == {"retries", "oom"}
    assert cuda["allocated"]["current"] > 0 and cuda["system"]["total"] > 0


# ------------------------------------------------------------------ hostile infotext sizes


@given(st.text(alphabet='ab1 :,"\\\t-/_.é\n', max_size=40))
@settings(max_examples=3000, deadline=None)
def test_param_pairs_equals_webuis_findall(line: str) -> None:
    # Our linear scan gives exactly what webui's re_param.findall gives.
    from engine.infotext import _PARAM_RE, param_pairs

    assert param_pairs(line) == _PARAM_RE.findall(line)


@pytest.mark.parametrize(
    "text",
    [
        "word " * 180_000,  # one 900 kB line of key characters: quadratic for re.findall
        "a\n" * 300_000,  # many lines: quadratic for string concatenation
        'k: "' + "x, " * 200_000,  # an unclosed quote
    ],
    ids=["long-line", "many-lines", "open-quote"],
)
def test_png_info_of_a_huge_text_chunk_is_quick(engine: Engine, text: str) -> None:
    import time

    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    buffer = io.BytesIO()
    card_image(8, 8).save(buffer, format="PNG", pnginfo=meta)
    body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode()})
    started = time.perf_counter()
    info = engine.handle("png-info", body).listing
    elapsed = time.perf_counter() - started
    assert info["info"] == text
    # Linear work is well under a second here; webui's quadratic parse takes hours.
    assert elapsed < 10, elapsed
