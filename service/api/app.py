"""The FastAPI application: lifespan (load model, registry, engine), routers, and JSON error handling."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.api.auth import AuthMiddleware
from service.api.error_bodies import error_body, service_error_body
from service.api.keys import ApiKeys
from service.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.api.routes import generate, health, metrics as metrics_route, openai, prefixes, tasks
from service.api.state import ServiceState
from service.compute_thread import run_in_fresh_thread
from service.batch import PrefixProber
from service.engine import ContinuousBatchingEngine, EngineLimits
from service.errors import ServiceError, UnauthorizedError
from service.inputs import InputProcessor
from service.kv_store import PrefixBank
from service.metrics import Metrics
from service.model_loader import LoadedModel, load_base_model
from service.prefix import TaskPrefix
from service.prefix_format import json_type
from service.registry import PrefixRegistry
from service.runner import ModelRunner
from service.settings import Settings
from service.startup import check_model

logger = logging.getLogger(__name__)


def make_registry(
    settings: Settings,
    loaded: LoadedModel,
    metrics: Metrics | None,
    *,
    shared: bool,
    device: torch.device | None = None,
    probe: Callable[[TaskPrefix], None] | None = None,
    device_tier: bool = True,
) -> PrefixRegistry:
    """The prefix store with the settings' limits, for the single-process server, the Ray ingress (`device` cpu) and
    each Ray replica: one place, so every process accepts the same tasks (a task made from text may be longer than
    max_virtual_tokens). Not loaded yet (`load_all`). `device_tier=False`: the engine's prefix bank will be the
    device tier (the slot layout)."""
    return PrefixRegistry(
        settings.prefix_dir,
        loaded.geometry,
        device=loaded.device if device is None else device,
        dtype=loaded.dtype,
        served_model_name=loaded.name,
        max_virtual_tokens=settings.max_virtual_tokens,
        max_prefix_bytes=settings.max_prefix_bytes,
        max_config_bytes=settings.max_config_bytes,
        max_prefixes=settings.max_prefixes,
        max_text_tokens=settings.max_text_task_tokens,
        max_template_chars=settings.max_template_chars,
        max_description_chars=settings.max_description_chars,
        device_budget_bytes=settings.prefix_device_budget_bytes,
        host_budget_bytes=settings.prefix_host_budget_bytes,
        metrics=metrics,
        shared=shared,
        probe=probe,
        device_tier=device_tier,
    )


def build_state(settings: Settings, loaded: LoadedModel, metrics: Metrics) -> ServiceState:
    """Wire registry and engine around a loaded model. Blocking: indexes the prefix store (no weights are read)."""
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    layout = check_model(runner, loaded.geometry, settings.batching)  # every start-up check; forwards run here
    # Probes of uploads that arrive together (a bulk import's threads) share forwards. The slot layout's prefix bank
    # is the device tier: the registry keeps prefixes in host memory, the bank holds the one device copy of each hot
    # prefix (idle ones within the device budget).
    registry = make_registry(
        settings, loaded, metrics, shared=settings.shared_prefix_store, probe=PrefixProber(runner),
        device_tier=layout != "slots",
    )
    registry.load_all()
    engine = ContinuousBatchingEngine(
        runner, policy=settings.batching, limits=EngineLimits.from_settings(settings), layout=layout
    )

    def attach_bank(bank: PrefixBank) -> None:
        bank.set_idle_budget(settings.prefix_device_budget_bytes)
        registry.attach_device_tier(bank)

    engine.on_prefix_bank = attach_bank
    engine.on_pass = metrics.observe_pass
    engine.on_row_error = lambda error: metrics.observe_generation_error(error.code)
    metrics.bind_gauges(lambda: engine.queue_size, lambda: engine.stats.running_rows)
    metrics.bind_kv_gauges(lambda: engine.stats.kv_bytes, lambda: engine.stats.prefix_bank_bytes)
    metrics.bind_tasks(lambda name: name in registry or name == loaded.name)
    return ServiceState(
        settings=settings, model=loaded, registry=registry, engine=engine, metrics=metrics,
        api_keys=ApiKeys.from_settings(settings), inputs=InputProcessor(settings, loaded, registry),
    )


StateBuilder = Callable[[Settings, Metrics], Awaitable[ServiceState]]


def create_app(
    settings: Settings | None = None,
    loaded: LoadedModel | None = None,
    *,
    build: StateBuilder | None = None,
    health_router: APIRouter | None = None,
) -> FastAPI:
    """Build the app. `loaded` injects an already-loaded model (tests); otherwise the lifespan loads one. `build`
    replaces the whole state (the Ray ingress: a remote engine, no weights) and `health_router` the /health route."""
    settings = settings or Settings()
    metrics = Metrics(max_tasks=settings.metrics_max_tasks)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if build is not None:
            state = await build(settings, metrics)
        else:
            # Loading and the start-up checks compute; a thread that exits afterwards leaves the engine thread the
            # only live OpenMP team (see service.compute_thread).
            model = loaded or await asyncio.to_thread(run_in_fresh_thread, load_base_model, settings)
            state = await asyncio.to_thread(run_in_fresh_thread, build_state, settings, model, metrics)
        state.engine.start()
        app.state.service = state
        model = state.model
        logger.info(
            "serving %s on %s (%s) with %d prefixes", model.name, model.device, model.dtype, len(state.registry)
        )
        try:
            yield
        finally:
            state.engine.stop()
            state.inputs.close()

    app = FastAPI(
        title="prefix-serve",
        version=__version__,
        description="Serve many Prefix-Tuning (PEFT) tasks from one frozen language model.",
        lifespan=lifespan,
        # Starlette's trailing-slash redirect builds its Location from the client's Host header (an open redirect,
        # answered before auth): a path with a stray slash is a plain 404 instead.
        redirect_slashes=False,
    )
    # Each router declares its own auth (`require(...)` dependencies); AuthMiddleware enforces the same declarations.
    routers = [
        health_router or health.router, metrics_route.router, generate.router, tasks.router, prefixes.router,
        openai.router,
    ]
    for router in routers:
        app.include_router(router)
    _install_error_handlers(app)
    # Added innermost first: request context (ids, metrics, access log) wraps auth, which runs from the headers
    # before the body cap and before anything reads the body.
    app.add_middleware(
        BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, max_json_body_bytes=settings.max_json_body_bytes,
        max_bulk_body_bytes=settings.max_bulk_body_bytes,
    )
    app.add_middleware(AuthMiddleware, routers=routers)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON in the shape of the route's API (service.api.error_bodies), with a message that names the
    problem; nothing a client sends should reach the 500 handler."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        retry_after = exc.details.get("retry_after_s")
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        if isinstance(exc, UnauthorizedError):
            headers = {"WWW-Authenticate": "Bearer"}
        content = service_error_body(request.url.path, exc)
        return JSONResponse(status_code=exc.status_code, content=content, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        fields = []
        for err in exc.errors():
            where = _location(err.get("loc", ()))
            fields.append(where)
            problems.append(f"{where}: {err.get('msg')}{_got(err)}")
        message = "; ".join(problems) or "invalid request"
        details = {
            "field": fields[0] if fields else None,
            "detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()],
        }
        content = error_body(request.url.path, 422, message, "validation_error", details)
        return JSONResponse(status_code=422, content=content)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 400:  # FastAPI's "error parsing the body": JSON is parsed earlier, so a broken form
            message = (
                "body: the multipart/form-data body could not be parsed (a missing or wrong boundary, or a malformed "
                "part header); send task_id, adapter_config and adapter_model as a multipart form"
            )
            content = error_body(path, 422, message, "validation_error", {"field": "body"})
            return JSONResponse(status_code=422, content=content)
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {path[:200]} (see /docs for the API)"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {path[:200]}"
        content = error_body(path, exc.status_code, detail, "http_error")
        return JSONResponse(status_code=exc.status_code, content=content, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        content = error_body(request.url.path, 500, "internal server error", "internal_error")
        return JSONResponse(status_code=500, content=content)


def _location(loc: tuple | list) -> str:
    """`("body", "parameters", "temperature")` -> `parameters.temperature`; `("body", "messages", 0, "name")` ->
    `messages[0].name`, as the client would write the path."""
    where = ""
    for part in loc:
        if part == "body" and not where:
            continue
        if isinstance(part, int):
            where += f"[{part}]"
        else:
            where += f".{part}" if where else str(part)
    return where or "body"


def _got(err: dict) -> str:
    """What the client sent, for type errors (`max_new_tokens: true` -> "got boolean true"): short and JSON-typed."""
    if err.get("type") in ("missing", "extra_forbidden") or "input" not in err:
        return ""
    value = err["input"]
    if isinstance(value, (dict, list)):
        return f", got a JSON {'object' if isinstance(value, dict) else 'array'}"
    try:
        shown = json.dumps(value)
    except (TypeError, ValueError):
        return ""
    if len(shown) > 60:
        shown = shown[:57] + "..."
    kind = json_type(value)
    return f", got {kind} {shown}"
