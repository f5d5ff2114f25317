"""Server-sent events shared by /generate_stream and the OpenAI routes."""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncGenerator, AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from service.api.error_bodies import error_body, service_error_body
from service.errors import ServiceError

logger = logging.getLogger(__name__)


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One `data:` event."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def event_stream(
    chunks: AsyncIterator[str], engine_events: AsyncGenerator[Any, None], *, path: str
) -> StreamingResponse:
    """Stream `chunks`. The status line is already sent when generation fails midway (e.g. the deadline), so the
    failure becomes a last `data: {"error": ...}` event, in the error shape of the route's API (`path`). Closing the
    engine's iterator at the end, or when the client goes away, retires the row."""

    async def guarded() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except ServiceError as exc:
            yield sse(service_error_body(path, exc))
        except Exception:  # noqa: BLE001 - a failed decode step: tell the client instead of cutting the stream
            logger.exception("streaming failed")
            yield sse(error_body(path, 500, "internal server error", "internal_error"))
        finally:
            await engine_events.aclose()

    return StreamingResponse(guarded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
