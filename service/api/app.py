"""The FastAPI application: lifespan (load model, registry, engine), routers, and JSON error handling."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.api.auth import ApiKeys, require
from service.api.middleware import RequestContextMiddleware
from service.api.routes import generate, health, metrics as metrics_route, openai, prefixes
from service.api.state import ServiceState
from service.batch import ModelRunner, verify_prefix_support
from service.engine import ContinuousBatchingEngine, EngineLimits
from service.errors import ServiceError, UnauthorizedError
from service.metrics import Metrics
from service.model_loader import LoadedModel, load_base_model
from service.registry import PrefixRegistry
from service.settings import Settings

logger = logging.getLogger(__name__)


def engine_limits(settings: Settings) -> EngineLimits:
    return EngineLimits(
        max_running_rows=settings.max_running_rows,
        max_kv_tokens=settings.max_kv_tokens,
        max_waiting=settings.max_waiting,
        max_prefill_rows=settings.max_prefill_rows,
        per_task_window_s=settings.batch_window_ms / 1000.0,
        request_timeout_s=settings.request_timeout_s,
    )


def build_state(settings: Settings, loaded: LoadedModel, metrics: Metrics) -> ServiceState:
    """Wire registry and engine around a loaded model. Blocking: loads every stored prefix."""
    runner = ModelRunner(loaded.model, loaded.tokenizer)
    verify_prefix_support(runner, loaded.geometry)
    registry = PrefixRegistry(
        settings.prefix_dir,
        loaded.geometry,
        device=loaded.device,
        dtype=loaded.dtype,
        served_model_name=loaded.name,
        max_virtual_tokens=settings.max_virtual_tokens,
        max_prefix_bytes=settings.max_prefix_bytes,
        max_config_bytes=settings.max_config_bytes,
        max_prefixes=settings.max_prefixes,
        device_budget_bytes=settings.prefix_device_budget_bytes,
        host_budget_bytes=settings.prefix_host_budget_bytes,
        metrics=metrics,
        shared=settings.shared_prefix_store,
    )
    registry.load_all()
    engine = ContinuousBatchingEngine(runner, policy=settings.batching, limits=engine_limits(settings))
    engine.on_pass = metrics.batch_size.observe
    metrics.bind_gauges(lambda: engine.stats.waiting, lambda: engine.stats.running_rows)
    return ServiceState(
        settings=settings, model=loaded, registry=registry, engine=engine, metrics=metrics,
        api_keys=ApiKeys.from_settings(settings),
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
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if build is not None:
            state = await build(settings, metrics)
        else:
            model = loaded or await asyncio.to_thread(load_base_model, settings)
            state = await asyncio.to_thread(build_state, settings, model, metrics)
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

    app = FastAPI(
        title="prefix-serve",
        version=__version__,
        description="Serve many Prefix-Tuning (PEFT) tasks from one frozen language model.",
        lifespan=lifespan,
    )
    app.include_router(health_router or health.router)
    app.include_router(metrics_route.router)
    app.include_router(generate.router, dependencies=[Depends(require("generate"))])
    app.include_router(prefixes.router)
    app.include_router(openai.router, dependencies=[Depends(require("generate"))])
    _install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_: Request, exc: ServiceError) -> JSONResponse:
        retry_after = exc.details.get("retry_after_s")
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        if isinstance(exc, UnauthorizedError):
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(status_code=exc.status_code, content=exc.to_json(), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}")
        return JSONResponse(
            status_code=422,
            content={
                "error": "; ".join(problems) or "invalid request",
                "type": "validation_error",
                "detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()],
            },
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (bad UTF-8, broken multipart): bad input
            return JSONResponse(status_code=422, content={"error": f"body: {exc.detail}", "type": "validation_error"})
        return JSONResponse(
            status_code=exc.status_code, content={"error": str(exc.detail), "type": "http_error"}, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(status_code=500, content={"error": "internal server error", "type": "internal_error"})
