"""The local webui server (sdapi/) over loopback: webuiapi 0.9.17 unchanged, webui's shapes,
the ControlNet extension's own API test requests, progress/interrupt/skip per task, fair
turns between clients, auth, body limits, options and CORS.

Pictures are compared as decoded pixels with the same body run directly on the engine."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import webuiapi
from PIL import Image

from engine.api import Engine
from engine.listings import INSPECTORS, LISTINGS
from engine.oom import OutOfMemory
from sdapi.app import ServerConfig, parse_auth

from .helpers import SD1, SDXL, b64_png, box_mask, card_image, payload
from .sdapi_server import Client, serving, wait_until

USERS = {"alice": "pw-a", "bob": "pw-b"}
LONG = 60  # steps of a request that runs long enough to be watched and interrupted


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def engine_pixels(engine: Engine, endpoint: str, body: str) -> list[np.ndarray]:
    response = engine.handle(endpoint, body)
    return [np.asarray(Image.open(io.BytesIO(i.data)).convert("RGB")) for i in response.images]


def level_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with serving(engine) as base:
        yield base


@pytest.fixture(scope="module")
def auth_url(engine: Engine) -> Iterator[str]:
    with serving(engine, ServerConfig(auth=USERS)) as base:
        yield base


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def webui(base: str, **auth: str) -> tuple[webuiapi.WebUIApi, list[bytes]]:
    """A webuiapi client and the request bodies it sends (to replay them on the engine)."""
    host, port = host_port(base)
    api = webuiapi.WebUIApi(host=host, port=port, **auth)
    sent: list[bytes] = []
    api.session.hooks["response"].append(lambda r, *a, **k: sent.append(r.request.body or b""))
    return api, sent


def long_body(**changes: Any) -> dict[str, Any]:
    return json.loads(payload(steps=LONG, seed=77, **changes))


@pytest.fixture(scope="module")
def long_full(engine: Engine) -> np.ndarray:
    """The picture of long_body() run to the end."""
    return engine_pixels(engine, "txt2img", json.dumps(long_body()))[0]


# ---- webuiapi, unchanged


def test_webuiapi_txt2img_gives_the_engines_picture(url: str, engine: Engine) -> None:
    api, sent = webui(url)
    result = api.txt2img(prompt="a red boat", width=64, height=96, steps=4, seed=5)
    assert result.image.size == (64, 96)
    assert isinstance(result.parameters, dict) and result.parameters["steps"] == 4
    assert result.info["seed"] == 5
    direct = engine_pixels(engine, "txt2img", sent[-1].decode())
    assert np.array_equal(np.asarray(result.image.convert("RGB")), direct[0])


def test_webuiapi_img2img_with_a_mask(url: str, engine: Engine) -> None:
    api, sent = webui(url)
    init = card_image(64, 64)
    mask = box_mask(64, 64, (16, 16, 47, 47))
    result = api.img2img(
        images=[init], mask_image=mask, prompt="a cat", steps=4, seed=3, width=64, height=64
    )
    assert result.image.size == (64, 64)
    direct = engine_pixels(engine, "img2img", sent[-1].decode())
    got = np.asarray(result.image.convert("RGB"))
    assert np.array_equal(got, direct[0])
    # Far from the mask the original stays; inside it the picture was redrawn.
    original = np.asarray(init)
    assert level_change(got[:6, :], original[:6, :]) < 1.0
    assert level_change(got[24:40, 24:40], original[24:40, 24:40]) > 5.0


def test_webuiapi_controlnet_unit(url: str, engine: Engine) -> None:
    api, sent = webui(url)
    unit = webuiapi.ControlNetUnit(
        image=card_image(64, 64),
        module="canny",
        model="tiny-controlnet-sd15",
        threshold_a=100,
        threshold_b=200,
    )
    result = api.txt2img(prompt="a house", width=64, height=64, steps=4, seed=9,
                         controlnet_units=[unit])  # fmt: skip
    assert len(result.images) == 2  # the picture, then the detected map (webui's order)
    assert "ControlNet 0" in result.info["infotexts"][0]
    direct = engine_pixels(engine, "txt2img", sent[-1].decode())
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), direct[0])
    # webuiapi keeps the units in its mutable default `alwayson_scripts={}` (a client quirk):
    # a fresh dict is passed so that this request really has no unit.
    without = api.txt2img(
        prompt="a house", width=64, height=64, steps=4, seed=9, alwayson_scripts={}
    )
    assert b"ControlNet" not in sent[-1]
    assert level_change(np.asarray(without.image.convert("RGB")), direct[0]) > 0.25


def test_listings_answer_what_the_engine_lists(url: str, engine: Engine) -> None:
    api, _ = webui(url)
    assert api.get_sd_models() == json.loads(json.dumps(LISTINGS["sd-models"](engine)))
    client = Client(url)
    for name, listing in LISTINGS.items():
        status, reply = client.get(f"/sdapi/v1/{name}")
        assert status == 200, (name, reply)
        if name != "memory":  # live numbers
            assert reply == json.loads(json.dumps(listing(engine))), name
    assert client.get("/sdapi/v1/options") == (200, INSPECTORS["options"](engine, "{}"))
    status, models = client.get("/controlnet/model_list")
    assert status == 200 and any("tiny-controlnet-sd15" in m for m in models["model_list"])
    status, reply = client.get("/controlnet/nothing")
    assert status == 404 and "controlnet/model_list" in reply["detail"]
    status, scripts = client.get("/sdapi/v1/scripts")
    assert "controlnet" in scripts["txt2img"]


def test_extras_and_png_info_in_webui_shapes(url: str) -> None:
    client = Client(url)
    card = b64_png(card_image(32, 24))
    status, single = client.post(
        "/sdapi/v1/extra-single-image",
        {"image": card, "upscaler_1": "Lanczos", "upscaling_resize": 2},
    )
    assert status == 200, single
    assert decoded(single["image"]).shape == (48, 64, 3) and "html_info" in single
    status, batch = client.post(
        "/sdapi/v1/extra-batch-images",
        {"imageList": [{"data": card, "name": "a.png"}] * 2, "upscaler_1": "Lanczos"},
    )
    assert status == 200 and len(batch["images"]) == 2
    status, made = client.post("/sdapi/v1/txt2img", json.loads(payload()))
    status, info = client.post("/sdapi/v1/png-info", {"image": made["images"][0]})
    assert status == 200
    assert info["info"] == json.loads(made["info"])["infotexts"][0]


# ---- the ControlNet extension's own API test requests (tests/web_api/txt2img_test.py)


def extension_request(units: int, **changes: Any) -> dict[str, Any]:
    image = b64_png(card_image(64, 64))
    unit = {
        "module": "none",
        "model": "tiny-controlnet-sd15",
        "weight": 1.0,
        "input_image": image,
        "mask": image,
        "resize_mode": 1,
        "lowvram": False,
        "processor_res": 64,
        "threshold_a": 64,
        "threshold_b": 64,
        "guidance_start": 0.0,
        "guidance_end": 1.0,
        "guessmode": False,
    }
    body = {
        "enable_hr": False,
        "denoising_strength": 0,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "prompt": "example prompt",
        "styles": [],
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": -1,
        "seed_resize_from_w": -1,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 3,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "tiling": False,
        "negative_prompt": "",
        "eta": 0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "sampler_index": "Euler a",
        "alwayson_scripts": {"ControlNet": {"args": [unit] * units}},
    }
    return {**body, **changes}


@pytest.mark.parametrize(
    ("units", "changes", "images"),
    [(1, {}, 1), (2, {}, 1), (1, {"n_iter": 2}, 2), (1, {"batch_size": 2}, 2)],
    ids=["simple", "2-units", "multiple-batches", "batch"],
)
def test_controlnet_extension_requests(
    url: str, units: int, changes: dict[str, Any], images: int
) -> None:
    status, reply = Client(url).post("/sdapi/v1/txt2img", extension_request(units, **changes))
    assert status == 200, reply
    # The generated pictures only: module "none" shows no detected map (the extension's rule).
    assert len(reply["images"]) == images
    infotext = json.loads(reply["info"])["infotexts"][0]
    assert all(f"ControlNet {i}: " in infotext for i in range(units))


def test_controlnet_extension_default_params_and_eight_units(url: str) -> None:
    client = Client(url)
    body = extension_request(1)
    body["alwayson_scripts"]["ControlNet"]["args"] = [
        {"input_image": b64_png(card_image(64, 64)), "model": "tiny-controlnet-sd15"}
    ]
    status, reply = client.post("/sdapi/v1/txt2img", body)
    assert status == 200, reply
    # The extension's own test sends 8 enabled units; the server's documented bound is 3.
    status, reply = client.post("/sdapi/v1/txt2img", extension_request(8))
    assert status == 422 and "SD_LIMIT_MAX_CONTROLNET_UNITS" in reply["detail"]


# ---- progress, interrupt, skip


def test_progress_counts_sampler_steps_as_webuis_state_does(engine: Engine) -> None:
    """webui's /progress reads state.sampling_step, which its sampler callback sets to the
    index of the step just completed (callback_state), over state.sampling_steps: sampler
    steps, where Heun calls the model twice per step (k-diffusion sample_heun: 2 + 2 + 2 + 1
    calls over 4 steps). The engine's plain progress callback counts the model calls."""
    from sdapi.tasks import Task

    seen: list[tuple[str, int, int]] = []

    class Recorder:
        def __call__(self, call: int, calls: int) -> None:
            seen.append(("call", call, calls))

        def observe(self, denoised: Any, sdxl: bool, step: int, steps: int) -> None:
            seen.append(("state", step, steps))

    body = payload(sampler_name="Heun", steps=4)
    engine.handle("txt2img", body, lambda s, t: None)  # warm: nothing below is a first load
    engine.handle("txt2img", body, Recorder())
    states = [(step, steps) for kind, step, steps in seen if kind == "state"]
    assert states == [(0, 4)] * 4 + [(1, 4)] * 2 + [(2, 4)]
    # Model calls over webui's total_steps (steps x 2 for a second-order sampler).
    assert [(c, n) for kind, c, n in seen if kind == "call"] == [(i, 8) for i in range(1, 8)]
    task = Task("client", "txt2img", run=lambda t: None)
    engine.handle("txt2img", body, task)
    assert (task.job_no, task.sampling_step, task.sampling_steps) == (0, 2, 4)


def run_in_thread(target: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["value"] = target()
        except Exception as exc:  # noqa: BLE001 (re-raised by the test through `out`)
            out["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


def finished(thread: threading.Thread, out: dict[str, Any]) -> Any:
    thread.join(timeout=300)
    assert not thread.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_progress_then_interrupt_returns_the_picture_so_far(
    url: str, long_full: np.ndarray
) -> None:
    api, _ = webui(url)
    thread, out = run_in_thread(lambda: api.txt2img(**long_body()))
    progress = wait_until(
        lambda: (p := api.get_progress())["state"]["sampling_step"] >= 2 and p,
        "the run to report steps",
    )
    assert progress["state"]["sampling_steps"] == LONG
    assert progress["state"]["job_count"] == 1 and 0 < progress["progress"] < 1
    assert progress["current_task"] and progress["eta_relative"] >= 0
    preview = decoded(progress["current_image"])  # webui's cheap latent preview
    assert preview.shape == (8, 8, 3)
    api.interrupt()
    result = finished(thread, out)
    assert result.image.size == (64, 64)
    # Stopped early: the picture is the last prediction, not the finished one.
    assert level_change(np.asarray(result.image.convert("RGB")), long_full) > 0.25
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job"] == "" and idle["current_task"] is None


def test_skip_ends_only_the_current_batch(url: str, engine: Engine) -> None:
    client = Client(url)
    body = json.loads(payload(steps=30, seed=21, n_iter=2))
    full = engine_pixels(engine, "txt2img", json.dumps(body))
    thread, out = run_in_thread(lambda: client.post("/sdapi/v1/txt2img", body))
    wait_until(
        lambda: client.get("/sdapi/v1/progress")[1]["state"]["sampling_step"] >= 2,
        "the first batch to run",
    )
    assert client.post("/sdapi/v1/skip")[0] == 200
    status, reply = finished(thread, out)
    assert status == 200 and len(reply["images"]) == 2
    assert level_change(decoded(reply["images"][0]), full[0]) > 0.25
    assert np.array_equal(decoded(reply["images"][1]), full[1])


def test_an_interrupt_touches_only_the_callers_task(
    auth_url: str, engine: Engine, long_full: np.ndarray
) -> None:
    alice, bob = Client(auth_url, "alice", "pw-a"), Client(auth_url, "bob", "pw-b")
    short = json.loads(payload(seed=8))
    short_alone = engine_pixels(engine, "txt2img", json.dumps(short))[0]
    alice_running = lambda: alice.get("/sdapi/v1/progress")[1]["state"]["sampling_step"] >= 2  # noqa: E731
    # 1. Bob interrupts while Alice's task runs: hers finishes untouched; bob sees nothing of hers.
    a_thread, a_out = run_in_thread(lambda: alice.post("/sdapi/v1/txt2img", long_body()))
    wait_until(alice_running, "alice's task to run")
    seen = bob.get("/sdapi/v1/progress")[1]
    assert seen["current_task"] is None and seen["current_image"] is None
    b_thread, b_out = run_in_thread(lambda: bob.post("/sdapi/v1/txt2img", short))
    assert bob.post("/sdapi/v1/interrupt") == (200, {})
    status, reply = finished(a_thread, a_out)
    assert status == 200 and np.array_equal(decoded(reply["images"][0]), long_full)
    status, reply = finished(b_thread, b_out)
    assert status == 200 and np.array_equal(decoded(reply["images"][0]), short_alone)
    # 2. Alice interrupts her own task while Bob's waits behind it: Bob's picture is unchanged.
    a_thread, a_out = run_in_thread(lambda: alice.post("/sdapi/v1/txt2img", long_body()))
    wait_until(alice_running, "alice's second task to run")
    b_thread, b_out = run_in_thread(lambda: bob.post("/sdapi/v1/txt2img", short))
    wait_until(lambda: bob.get("/sdapi/v1/progress")[1]["current_task"], "bob's task to queue")
    assert alice.post("/sdapi/v1/interrupt") == (200, {})
    status, reply = finished(a_thread, a_out)
    assert status == 200 and level_change(decoded(reply["images"][0]), long_full) > 0.25
    status, reply = finished(b_thread, b_out)
    assert status == 200 and np.array_equal(decoded(reply["images"][0]), short_alone)


def test_turns_are_fair_between_clients_and_tasks_report_by_id(auth_url: str) -> None:
    alice, bob = Client(auth_url, "alice", "pw-a"), Client(auth_url, "bob", "pw-b")
    order: list[str] = []

    def submit(client: Client, task_id: str, steps: int) -> Any:
        body = json.loads(payload(steps=steps, force_task_id=task_id))
        status, _reply = client.post("/sdapi/v1/txt2img", body)
        order.append(task_id)
        return status

    def state(client: Client, task_id: str) -> dict[str, Any]:
        return client.post("/internal/progress", {"id_task": task_id, "live_preview": True})[1]

    threads = [run_in_thread(lambda: submit(alice, "a1", 40))]
    wait_until(lambda: state(alice, "a1")["active"], "a1 to run")
    # a2 then a3, each queued before the next is sent (two threads at once race to the server).
    for task in ("a2", "a3"):
        threads.append(run_in_thread(lambda t=task: submit(alice, t, 4)))
        wait_until(lambda t=task: state(alice, t)["queued"], f"{task} to queue")
    threads.append(run_in_thread(lambda: submit(bob, "b1", 4)))
    queued = wait_until(lambda: (s := state(bob, "b1"))["queued"] and s, "b1 to queue")
    # Bob has not been served yet, so he goes next: one task (a1, running) ahead of him.
    assert queued["textinfo"] == "In queue: 1 task(s) ahead"
    running = state(alice, "a1")
    assert running["active"] and running["progress"] > 0
    assert state(bob, "a1")["active"] is False  # another user's task id tells bob nothing
    assert all(finished(*t) == 200 for t in threads)
    assert order == ["a1", "b1", "a2", "a3"]
    done = state(alice, "a3")
    assert done["completed"] is True, done


# ---- errors, auth, limits, options, CORS


def test_errors_are_webui_shaped_and_answered_before_the_queue(url: str) -> None:
    client = Client(url)
    thread, out = run_in_thread(lambda: client.post("/sdapi/v1/txt2img", long_body()))
    wait_until(lambda: client.get("/sdapi/v1/progress")[1]["state"]["sampling_step"] >= 1, "a run")
    status, reply = client.post("/sdapi/v1/txt2img", json.loads(payload(steps=0)))
    # Answered while the long task still runs: checked before it queued.
    still = client.get("/sdapi/v1/progress")[1]["state"]["sampling_step"]
    assert status == 422 and still < LONG
    assert reply["error"] == "RequestError" and "steps: got 0" in reply["detail"]
    assert reply["errors"] == reply["detail"] and "body" in reply
    status, reply = client.post("/sdapi/v1/txt2img", json.loads(payload(sampler_name="Nope")))
    assert status == 422 and "sampler_name" in reply["detail"] and "Euler" in reply["detail"]
    assert finished(thread, out)[0] == 200


def test_basic_auth(auth_url: str) -> None:
    status, _reply, headers = Client(auth_url).call("GET", "/sdapi/v1/sd-models")
    assert status == 401 and headers.get("www-authenticate") == "Basic"
    assert Client(auth_url, "alice", "wrong").get("/sdapi/v1/sd-models")[0] == 401
    assert Client(auth_url, "mallory", "pw-a").get("/sdapi/v1/progress")[0] == 401
    host, port = host_port(auth_url)
    api = webuiapi.WebUIApi(host=host, port=port, username="alice", password="pw-a")
    assert next(m["title"] for m in api.get_sd_models()).startswith("tiny-sd15")
    assert parse_auth("a:1, b:2") == {"a": "1", "b": "2"}
    with pytest.raises(ValueError, match="user:password"):
        parse_auth("nopassword")


def test_request_body_size_is_capped_before_reading(engine: Engine) -> None:
    limit = 1000
    small = Engine(engine.models, dataclasses.replace(engine.limits, payload_bytes=limit))
    with serving(small) as base:
        host, port = host_port(base)

        def answer(headers: dict[str, str], data: bytes) -> tuple[int, dict[str, Any]]:
            conn = http.client.HTTPConnection(host, port, timeout=60)
            conn.putrequest("POST", "/sdapi/v1/txt2img")
            for key, value in headers.items():
                conn.putheader(key, value)
            conn.endheaders()
            conn.send(data)
            reply = conn.getresponse()
            body = json.loads(reply.read())
            conn.close()
            return reply.status, body

        # A declared length over the limit: refused before a byte of the body is read.
        status, reply = answer({"Content-Length": str(limit + 1)}, b"")
        assert status == 413 and f"got {limit + 1} bytes" in reply["detail"]
        assert "SD_LIMIT_MAX_PAYLOAD_BYTES" in reply["detail"]
        # Chunked, no length: refused once the bytes read pass the limit.
        chunk = b" " * 600
        status, reply = answer(
            {"Transfer-Encoding": "chunked"}, b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
        )
        assert status == 413 and "at least 1200 bytes" in reply["detail"]
        # Within the limit the same route works.
        small_body = payload().encode()
        status, reply = answer({"Content-Length": str(len(small_body))}, small_body)
        assert status == 200, reply


def test_options_set_only_the_default_checkpoint(engine: Engine) -> None:
    with serving(engine) as base:
        client = Client(base)
        xl = engine.models.catalog.resolve_checkpoint(SDXL).title
        assert client.post("/sdapi/v1/options", {"sd_model_checkpoint": xl}) == (200, None)
        assert client.get("/sdapi/v1/options")[1]["sd_model_checkpoint"] == xl
        status, reply = client.post("/sdapi/v1/txt2img", json.loads(payload()))
        assert json.loads(reply["info"])["sd_model_name"] == "tiny-sdxl"
        own = json.loads(payload(override_settings={"sd_model_checkpoint": SD1}))
        status, reply = client.post("/sdapi/v1/txt2img", own)
        assert json.loads(reply["info"])["sd_model_name"] == "tiny-sd15"
        status, reply = client.post("/sdapi/v1/options", {"sd_model_checkpoint": "nope"})
        assert status == 422 and "sd_model_checkpoint: got 'nope'" in reply["detail"]
        status, reply = client.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 2})
        assert status == 422 and "CLIP_stop_at_last_layers: got 2" in reply["detail"]
        assert "override_settings" in reply["detail"]
        # Sending back a value already in effect changes nothing and is accepted.
        current = client.get("/sdapi/v1/options")[1]["CLIP_stop_at_last_layers"]
        assert client.post("/sdapi/v1/options", {"CLIP_stop_at_last_layers": current})[0] == 200
    # Another server on the same engine still has the engine's default.
    with serving(engine) as base:
        assert (
            Client(base).get("/sdapi/v1/options")[1]["sd_model_checkpoint"].startswith("tiny-sd15")
        )


def test_cors_is_off_unless_asked_and_every_answer_is_timed(url: str, engine: Engine) -> None:
    origin = {"Origin": "http://example.test"}
    client = Client(url)
    client.headers.update(origin)
    status, _, headers = client.call("GET", "/sdapi/v1/samplers")
    assert status == 200 and "access-control-allow-origin" not in {k.lower() for k in headers}
    assert float(headers["x-process-time"]) >= 0
    with serving(engine, ServerConfig(cors_origins=("http://example.test",))) as base:
        other = Client(base)
        other.headers.update(origin)
        _, _, headers = other.call("GET", "/sdapi/v1/samplers")
        assert headers.get("access-control-allow-origin") == "http://example.test"


def test_interrupt_in_the_first_pass_skips_the_hires_pass(url: str) -> None:
    client = Client(url)
    body = long_body(enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.5)
    thread, out = run_in_thread(lambda: client.post("/sdapi/v1/txt2img", body))
    state = wait_until(
        lambda: (s := client.get("/sdapi/v1/progress")[1]["state"])["sampling_step"] >= 2 and s,
        "the first pass to run",
    )
    assert state["job_count"] == 2 and state["job_no"] == 0  # webui counts the hires pass
    assert client.post("/sdapi/v1/interrupt") == (200, {})
    status, reply = finished(thread, out)
    assert status == 200
    # webui's sample_hr_pass returns the first pass' samples when interrupted.
    assert decoded(reply["images"][0]).shape == (64, 64, 3)


def test_out_of_memory_is_a_507_in_webuis_error_body(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = Engine(engine.models, engine.limits)

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise OutOfMemory("out of memory while generating 1 image(s) of 64x64: try smaller")

    monkeypatch.setattr(failing, "generate", no_memory)
    with serving(failing) as base:
        status, reply = Client(base).post("/sdapi/v1/txt2img", json.loads(payload()))
    assert status == 507
    assert reply["error"] == "OutOfMemory" and "64x64" in reply["detail"]


def test_two_webuiapi_clients_at_once_get_their_own_pictures(url: str, engine: Engine) -> None:
    (first, sent_first), (second, sent_second) = webui(url), webui(url)
    jobs = [
        run_in_thread(lambda: first.txt2img(prompt="a fox", width=64, height=64, steps=6, seed=1)),
        run_in_thread(
            lambda: second.txt2img(prompt="a ship", width=96, height=64, steps=6, seed=2)
        ),
    ]
    results = [finished(*job) for job in jobs]
    assert [r.image.size for r in results] == [(64, 64), (96, 64)]
    for result, sent in zip(results, (sent_first, sent_second), strict=True):
        alone = engine_pixels(engine, "txt2img", sent[-1].decode())[0]
        assert np.array_equal(np.asarray(result.image.convert("RGB")), alone)
