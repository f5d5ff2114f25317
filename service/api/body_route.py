"""A route class that checks a request body before FastAPI's own parser sees it. A JSON body is parsed by
`service.inputs.parse_json_body`: FastAPI answers bad UTF-8, a 5,000-digit integer or deep nesting with a bare "There
was an error parsing the body", and a `Content-Type: text/plain` body with a validation error that never mentions the
content type; here each is a 4xx that says what is wrong. A form route (the upload) wants multipart/form-data (or a
urlencoded form, which cannot carry files), parsed by the upload's rules (`service.api.forms`)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine

from fastapi import params
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from service.api.forms import UploadFormLimits, parse_upload_form
from service.errors import UnsupportedMediaTypeError
from service.inputs import parse_json_body


# A form route: multipart (files), or a plain urlencoded form, which is what most clients send for fields alone (a
# task made from text has no files: `curl -d`, `httpx.post(data=...)`).
_FORM_MEDIA_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_INLINE_PARSE_BYTES = 64 * 1024  # parsing this much takes well under a millisecond


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class CheckedBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        body_field = getattr(self, "body_field", None)
        if body_field is None:
            return handler
        if isinstance(body_field.field_info, params.Form):

            async def check_form_then_handle(request: Request) -> Response:
                content_type = request.headers.get("content-type", "")
                if content_type.split(";", 1)[0].strip().lower() not in _FORM_MEDIA_TYPES:
                    shown = content_type[:100] or "none"
                    raise UnsupportedMediaTypeError(
                        f"Content-Type must be multipart/form-data for this route, got {shown}; send the fields "
                        "and files as a multipart form (curl -F, httpx files=...; a form without files, e.g. a task "
                        "made from text, may also be application/x-www-form-urlencoded)",
                        field="content-type", got=shown,
                    )
                # The one form route is the upload: its fields are read by the upload's rules (UTF-8, byte bounds).
                await parse_upload_form(request, UploadFormLimits.of(request.app.state.service))
                return await handler(request)

            return check_form_then_handle

        async def parse_then_handle(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if not is_json_media_type(content_type):
                shown = content_type[:100] or "none"
                raise UnsupportedMediaTypeError(
                    f"Content-Type must be application/json for this route, got {shown}; send the body as JSON",
                    field="content-type", got=shown,
                )
            raw = await request.body()
            # Starlette's Request.json() returns this cached value: FastAPI never runs json.loads on the body itself.
            # A large body (up to the JSON cap, 4 MiB by default) is parsed in a thread, off the event loop.
            request._json = parse_json_body(raw) if len(raw) <= _INLINE_PARSE_BYTES else (
                await asyncio.to_thread(parse_json_body, raw)
            )
            return await handler(request)

        return parse_then_handle
