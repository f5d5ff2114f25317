"""ASGI middleware (pure ASGI, so streaming responses and client disconnects pass straight through):
request ids, access log and request metrics; the request body size caps."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.error_bodies import service_error_body
from service.errors import PayloadTooLargeError
from service.logging_setup import request_id_var
from service.metrics import Metrics

access_log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_QUIET_ROUTES = frozenset({"/health", "/metrics"})


class RequestContextMiddleware:
    """Outermost: request id, access log and request metrics for every answer, including the 401s and 413s that
    the inner middlewares send without reaching the app."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = ""
        for name, value in scope.get("headers", []):
            if name.lower() == REQUEST_ID_HEADER.encode():
                offered = value.decode("latin-1")
                break
        request_id = offered if _CLIENT_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._finish(scope, status, started)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)

    def _finish(self, scope: Scope, status: int, started: float) -> None:
        duration = time.perf_counter() - started
        route_obj: Any = scope.get("route")
        route = getattr(route_obj, "path", None) or "unmatched"  # a template: task ids never become label values
        task = scope.get("state", {}).get("task_id", "")
        self.metrics.observe_request(route, task, str(status), duration)
        # Probes and scrapes arrive every few seconds: keep them out of the info-level access log.
        level = logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO
        access_log.log(
            level, "%s %s %d", scope.get("method"), route, status,
            extra={"request_id": scope.get("state", {}).get("request_id"), "method": scope.get("method"),
                   "route": route, "status": status,
                   "duration_ms": round(duration * 1000, 2), "task": task or None},
        )


BULK_PATH = "/prefixes/bulk"


class BodyLimitMiddleware:
    """Caps request bodies: bulk imports (`/prefixes/bulk`) at `max_bulk_body_bytes`, uploads (`/prefixes`) at
    `max_body_bytes`, every other route (JSON) at the much smaller
    `max_json_body_bytes`. A declared Content-Length over the cap is refused before a byte is read; a chunked body
    is refused as soon as the running count passes it. Runs after AuthMiddleware, so an unauthenticated client gets
    its 401 whatever it sends."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, max_json_body_bytes: int, max_bulk_body_bytes: int | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_body_bytes = max_json_body_bytes
        self.max_bulk_body_bytes = max_bulk_body_bytes if max_bulk_body_bytes is not None else max_body_bytes

    def limit_for(self, path: str) -> int:
        if path == BULK_PATH:  # a tar of many adapters, spooled to disk as it arrives
            return self.max_bulk_body_bytes
        return self.max_body_bytes if path == "/prefixes" or path.startswith("/prefixes/") else self.max_json_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limit_for(path)
        declared = ""
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                declared = value.decode("latin-1")
                break
        if declared.isdigit() and int(declared) > limit:
            await _send_error(send, path, PayloadTooLargeError(
                f"request body of {declared} bytes exceeds the {limit}-byte limit", limit=limit))
            return

        received = 0
        too_large = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body with no (or a false) Content-Length
                    too_large = True
                    raise PayloadTooLargeError(f"request body exceeds the {limit}-byte limit", limit=limit)
            return message

        async def replacing_send(message: Message) -> None:
            if too_large:
                # The app saw the exception mid-parse and answers with its own status (FastAPI's body parser turns
                # any error into a 400); replace that answer with the 413 it really is.
                if message["type"] == "http.response.start":
                    await _send_error(send, path, PayloadTooLargeError(
                        f"request body exceeds the {limit}-byte limit", limit=limit))
                return
            await send(message)

        await self.app(scope, counting_receive, replacing_send)


async def _send_error(send: Send, path: str, error: PayloadTooLargeError) -> None:
    body = json.dumps(service_error_body(path, error)).encode("utf-8")
    await send({
        "type": "http.response.start",
        "status": error.status_code,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})
