"""webui's `/sdapi/v1/*` routes over one engine: FastAPI app, request and response shapes.

Route handlers only adapt: a request body is read (size-capped), checked by the engine before
it queues, run by the queue's worker thread (sdapi/tasks.py), and answered in webui's shape
(base64 images without a data: prefix, `parameters` as an object, `info` as JSON text).
Errors use webui's error body `{error, detail, body, errors}`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware

from engine.api import GENERATION_ENDPOINTS, Engine
from engine.api import Response as EngineResponse
from engine.errors import EngineError, Problem, RequestError, show_choices
from engine.extras import EXTRAS_ENDPOINTS
from engine.listings import INSPECTORS, LISTINGS
from engine.oom import OutOfMemory

from .preview import cheap_preview, png_base64
from .tasks import FairQueue, Task

log = logging.getLogger(__name__)

# POST /sdapi/v1/options: what a server-wide default can safely be (a request that names a
# checkpoint in override_settings still gets its own). Everything else webui's options set is
# per request here (override_settings), so changing it globally would change other users'
# pictures: refused, unless the value is the one already in effect.
SETTABLE_OPTIONS = ("sd_model_checkpoint",)

STATUS = {RequestError: 422, OutOfMemory: 507}  # anything else from the engine: 500


@dataclass
class ServerConfig:
    """How the server runs: who may call it (webui's --api-auth) and from which web origins."""

    auth: dict[str, str] = field(default_factory=dict)  # user -> password; empty: no auth
    cors_origins: tuple[str, ...] = ()  # webui's --cors-allow-origins; none: CORS off


def parse_auth(text: str) -> dict[str, str]:
    """webui's --api-auth: `user:pass[,user2:pass2]`."""
    users: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth: got {item!r}; each entry must be user:password")
        users[user] = password
    if not users:
        raise ValueError("--api-auth: no user:password given")
    return users


class HTTPError(Exception):
    """An error this adapter raises itself (auth, body size, routing), with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_body(kind: str, message: str) -> dict[str, Any]:
    """webui's api_error_handler body."""
    return {"error": kind, "detail": message, "body": "", "errors": message}


class Server:
    """The engine in use (swapped whole on refresh or a new default), the queue, the config."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.queue = FairQueue()

    # ---- who is asking

    def client(self, request: Request) -> str:
        """The basic-auth user (checked), or the caller's address without auth."""
        if not self.config.auth:
            return request.client.host if request.client else "unknown"
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        user = password = ""
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user = ""
        expected = self.config.auth.get(user)
        # compare_digest on both paths, so a wrong user and a wrong password take as long.
        ok = secrets.compare_digest(password.encode(), (expected or "\0").encode())
        if expected is None or not ok:
            raise HTTPError(401, "Incorrect username or password", {"WWW-Authenticate": "Basic"})
        return f"user:{user}"

    # ---- the body, capped before it is read whole

    async def body(self, request: Request) -> str:
        limit = self.engine.limits.payload_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPError(413, _too_large(int(declared), limit))
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, _too_large(size, limit, at_least=True))
            chunks.append(chunk)
        try:
            return b"".join(chunks).decode("utf-8") or "{}"
        except UnicodeDecodeError as exc:
            raise RequestError.single("request body", "bytes", "must be UTF-8 JSON") from exc

    # ---- running things on the worker

    async def queued(self, task: Task) -> Any:
        self.queue.submit(task)
        return await asyncio.wrap_future(task.future)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    got = f"at least {size}" if at_least else str(size)
    return (
        f"request body: got {got} bytes; must be at most {limit} bytes (SD_LIMIT_MAX_PAYLOAD_BYTES)"
    )


def _images(response: EngineResponse) -> list[str]:
    return [base64.b64encode(image.data).decode("ascii") for image in response.images]


def _sniff(body: str) -> dict[str, Any]:
    """A small control body (options, interrupt, /internal/progress) as an object; anything
    else reads as empty."""
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving webui's routes from `engine`."""
    server = Server(engine, config or ServerConfig())
    app = FastAPI(title="sdapi", docs_url="/docs", on_shutdown=[server.queue.close])
    app.state.server = server
    if server.config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(server.config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    @app.middleware("http")
    async def process_time(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Process-Time"] = f"{time.perf_counter() - started:.4f}"
        return response

    @app.exception_handler(HTTPError)
    async def http_error(_: Request, exc: HTTPError) -> JSONResponse:
        body = error_body("HTTPException", str(exc))
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, exc: EngineError) -> JSONResponse:
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")  # webui's api_error_handler: 500, same body
        return JSONResponse(error_body(type(exc).__name__, str(exc)), status_code=500)

    # ---- generation and extras (queued)

    def generation(endpoint: str) -> Callable[[Request], Awaitable[dict[str, Any]]]:
        async def handler(request: Request) -> dict[str, Any]:
            client = server.client(request)
            body = await server.body(request)
            # 1. Checked and typed before it queues: a bad request is answered at once.
            parsed = await run_in_threadpool(server.engine.parse, endpoint, body)
            req = parsed.request
            task = Task(
                client,
                endpoint,
                lambda task: server.engine.generate(parsed, progress=task),
                n_iter=req.n_iter,
                passes=2 if getattr(req, "enable_hr", False) else 1,
            )
            if req.force_task_id:
                task.id = req.force_task_id
            # 2. Run in turn; 3. answer in webui's shape.
            response: EngineResponse = await server.queued(task)
            return {
                "images": _images(response),
                "parameters": response.parameters,
                "info": response.info,
            }

        return handler

    for endpoint in ("txt2img", "img2img"):
        assert endpoint in GENERATION_ENDPOINTS
        app.post(f"/sdapi/v1/{endpoint}")(generation(endpoint))

    def extras(endpoint: str) -> Callable[[Request], Awaitable[dict[str, Any]]]:
        async def handler(request: Request) -> dict[str, Any]:
            client = server.client(request)
            body = await server.body(request)
            task = Task(client, endpoint, lambda _: server.engine.handle(endpoint, body))
            response: EngineResponse = await server.queued(task)
            images = _images(response)
            if endpoint == "extra-single-image":
                return {"html_info": response.info, "image": images[0] if images else ""}
            return {"html_info": response.info, "images": images}

        return handler

    for endpoint in EXTRAS_ENDPOINTS:
        app.post(f"/sdapi/v1/{endpoint}")(extras(endpoint))

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request) -> Any:
        server.client(request)
        body = await server.body(request)
        return await run_in_threadpool(INSPECTORS["png-info"], server.engine, body)

    # ---- listings (read the engine in use; no queue)

    def listing(name: str) -> Callable[[Request], Awaitable[Any]]:
        async def handler(request: Request) -> Any:
            server.client(request)
            return await run_in_threadpool(LISTINGS[name], server.engine)

        return handler

    for name in LISTINGS:
        app.get(f"/sdapi/v1/{name}")(listing(name))

    @app.get("/sdapi/v1/options")
    async def get_options(request: Request) -> Any:
        server.client(request)
        return INSPECTORS["options"](server.engine, "{}")

    @app.get("/sdapi/v1/scripts")
    async def scripts(request: Request) -> dict[str, list[str]]:
        """webui lists script titles in lower case; here: the always-on scripts served."""
        server.client(request)
        registry = server.engine.models.extensions
        names = sorted({e.title.lower() for e in registry.extensions}) if registry else []
        return {"txt2img": names, "img2img": names}

    @app.get("/controlnet/{name:path}")
    async def extension_listing(name: str, request: Request) -> Any:
        """The ControlNet extension's own routes (/controlnet/model_list, ...)."""
        server.client(request)
        registry = server.engine.models.extensions
        listings = registry.listings() if registry else {}
        key = f"controlnet/{name}"
        if key not in listings:
            raise HTTPError(404, f"{key}: not served; available: {show_choices(listings)}")
        return await run_in_threadpool(listings[key])

    # ---- options: only what is safe as a server default

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request) -> None:
        server.client(request)
        body = _sniff(await server.body(request))
        current = INSPECTORS["options"](server.engine, "{}")
        refused = [
            key
            for key, value in body.items()
            if key not in SETTABLE_OPTIONS and current.get(key, object()) != value
        ]
        allowed = (
            f"this server sets only {show_choices(SETTABLE_OPTIONS)} for everyone (other "
            "users share the server); send it per request in override_settings instead"
        )
        if refused:
            raise RequestError([Problem(key, body[key], allowed) for key in refused])
        if "sd_model_checkpoint" in body:
            name = body["sd_model_checkpoint"]
            server.engine = server.engine.with_default_checkpoint(str(name))
            log.info("options: default checkpoint now %s", server.engine.models.default.title)

    # ---- refresh: a rescan, run in turn with generations, swapped in between requests

    def refresh(kind: str) -> Callable[[Request], Awaitable[None]]:
        async def handler(request: Request) -> None:
            client = server.client(request)

            def rescan(_: Task) -> None:
                server.engine = server.engine.rescanned()

            await server.queued(Task(client, f"refresh-{kind}", rescan))

        return handler

    for kind in ("checkpoints", "loras", "vae", "embeddings"):
        app.post(f"/sdapi/v1/refresh-{kind}")(refresh(kind))

    # ---- progress, interrupt, skip (each acts on the caller's own task)

    @app.get("/sdapi/v1/progress")
    async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
        client = server.client(request)
        task = server.queue.latest_for(client)
        return _progress(task, server.queue, with_image=not skip_current_image)

    async def own_task(request: Request) -> Task | None:
        """The task an interrupt or skip acts on: `id_task` in the body (the caller's), else
        the caller's running task."""
        client = server.client(request)
        wanted = _sniff(await server.body(request)).get("id_task")
        if wanted is None:
            return server.queue.running_for(client)
        task = server.queue.tasks.get(str(wanted))
        return task if task is not None and task.client == client else None

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request) -> dict[str, Any]:
        if (task := await own_task(request)) is not None:
            task.interrupted = True
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip(request: Request) -> None:
        if (task := await own_task(request)) is not None:
            task.skipped = True

    @app.post("/internal/progress")
    async def internal_progress(request: Request) -> dict[str, Any]:
        """webui's task progress by id (the id a request set with force_task_id)."""
        client = server.client(request)
        body = _sniff(await server.body(request))
        wanted = str(body.get("id_task", ""))
        task = server.queue.tasks.get(wanted)
        if task is not None and task.client != client:
            task = None  # another user's task: as unknown
        live = bool(body.get("live_preview", True))
        return _internal_progress(wanted, task, server.queue, live, body.get("id_live_preview"))

    return app


def _state(task: Task | None) -> dict[str, Any]:
    """webui's shared.state.dict()."""
    if task is None or not task.running:
        idle = task is None
        return {
            "skipped": False,
            "interrupted": False,
            "stopping_generation": False,
            "job": "" if idle else "queued",
            "job_count": 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
    assert task.started_at is not None
    return {
        "skipped": task.skipped,
        "interrupted": task.interrupted,
        "stopping_generation": False,
        "job": task.job_text(),
        "job_count": task.job_count,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.started_at)),
        "job_no": task.job_no,
        "sampling_step": task.sampling_step,
        "sampling_steps": task.sampling_steps,
    }


def _ahead(task: Task, queue: FairQueue) -> int:
    order = queue.queued()
    running = 1 if queue.current is not None else 0
    return running + next((i for i, t in enumerate(order) if t is task), len(order))


def _progress(task: Task | None, queue: FairQueue, with_image: bool) -> dict[str, Any]:
    """GET /sdapi/v1/progress for the caller's task (webui: for the one global job)."""
    if task is None or not task.running:
        textinfo = None if task is None else f"In queue: {_ahead(task, queue)} task(s) ahead"
        return {
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": _state(task),
            "current_image": None,
            "textinfo": textinfo,
            "current_task": None if task is None else task.id,
        }
    image = None
    if with_image and task.latest is not None:
        image = png_base64(cheap_preview(*task.latest))
    return {
        "progress": task.progress(),
        "eta_relative": task.eta_relative(),
        "state": _state(task),
        "current_image": image,
        "textinfo": None,
        "current_task": task.id,
    }


def _internal_progress(
    wanted: str, task: Task | None, queue: FairQueue, live: bool, last_preview: Any
) -> dict[str, Any]:
    """POST /internal/progress: webui's ProgressResponse for one task id."""
    if task is None:
        completed = wanted in queue.finished
        return {
            "active": False,
            "queued": False,
            "completed": completed,
            "progress": None,
            "eta": None,
            "live_preview": None,
            "id_live_preview": -1,
            "textinfo": None if completed else "Unknown task",
        }
    if not task.running:
        return {
            "active": False,
            "queued": True,
            "completed": False,
            "progress": None,
            "eta": None,
            "live_preview": None,
            "id_live_preview": -1,
            "textinfo": f"In queue: {_ahead(task, queue)} task(s) ahead",
        }
    preview = None
    fresh = task.preview_id != last_preview
    if live and fresh and task.latest is not None:
        preview = "data:image/png;base64," + png_base64(cheap_preview(*task.latest))
    return {
        "active": True,
        "queued": False,
        "completed": False,
        "progress": task.progress(),
        "eta": task.eta_relative(),
        "live_preview": preview,
        "id_live_preview": task.preview_id,
        "textinfo": task.job_text(),
    }
