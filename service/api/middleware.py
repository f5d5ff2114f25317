"""ASGI middleware (pure ASGI, so streaming responses and client disconnects pass straight through):
request ids, access log, request metrics and the request body size cap."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLargeError
from service.logging_setup import request_id_var
from service.metrics import Metrics

access_log = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_QUIET_ROUTES = frozenset({"/health", "/metrics"})


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        offered = headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if _CLIENT_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        received = 0
        limit = self.max_body_bytes

        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _send_error(send, request_id, PayloadTooLargeError(
                f"request body of {declared} bytes exceeds the {limit}-byte limit", limit=limit))
            self._finish(scope, 413, started)
            request_id_var.reset(token)
            return

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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if too_large:
                # The app saw the exception mid-parse and answers with its own status (FastAPI's body parser turns
                # any error into a 400); replace that answer with the 413 it really is.
                if message["type"] == "http.response.start":
                    status = 413
                    await _send_error(send, request_id, PayloadTooLargeError(
                        f"request body exceeds the {limit}-byte limit", limit=limit))
                    self._finish(scope, status, started)
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._finish(scope, status, started)

        try:
            await self.app(scope, counting_receive, send_with_id)
        finally:
            request_id_var.reset(token)

    def _finish(self, scope: Scope, status: int, started: float) -> None:
        duration = time.perf_counter() - started
        route_obj: Any = scope.get("route")
        route = getattr(route_obj, "path", None) or "unmatched"  # a template: task ids never become label values
        task = scope.get("state", {}).get("task_id", "")
        self.metrics.requests.labels(route, task, str(status)).inc()
        self.metrics.request_duration.labels(route, task, str(status)).observe(duration)
        # Probes and scrapes arrive every few seconds: keep them out of the info-level access log.
        level = logging.DEBUG if route in _QUIET_ROUTES and status < 400 else logging.INFO
        access_log.log(
            level, "%s %s %d", scope.get("method"), route, status,
            extra={"request_id": scope.get("state", {}).get("request_id"), "method": scope.get("method"),
                   "route": route, "status": status,
                   "duration_ms": round(duration * 1000, 2), "task": task or None},
        )


async def _send_error(send: Send, request_id: str, error: PayloadTooLargeError) -> None:
    body = json.dumps(error.to_json()).encode("utf-8")
    await send({
        "type": "http.response.start",
        "status": error.status_code,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", request_id.encode("latin-1"))],
    })
    await send({"type": "http.response.body", "body": body})
