"""POST /generate and /generate_stream: one prompt, one task, TGI-style responses. Requests are built by the shared
input processor (`service.inputs`): this module only maps TGI's JSON to it and the engine's results back."""

from __future__ import annotations

from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.api.auth import require
from service.api.body_route import CheckedBodyRoute
from service.api.schemas import (
    ErrorResponse,
    GenerateDetails,
    GenerateRequest,
    GenerateResponse,
    StreamEvent,
    StreamToken,
)
from service.api.sse import event_stream, sse
from service.api.state import ServiceState, get_state
from service.engine import TokenEvent
from service.inputs import TGI_FIELDS
from service.requests import GenerationRequest, GenerationResult

router = APIRouter(tags=["generate"], route_class=CheckedBodyRoute, dependencies=[Depends(require("generate"))])

_ERRORS: dict[int | str, dict] = {
    404: {"model": ErrorResponse, "description": "Unknown task"},
    413: {"model": ErrorResponse, "description": "Body over PREFIX_SERVE_MAX_JSON_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "The body is not application/json"},
    422: {"model": ErrorResponse, "description": "Bad parameters or prompt too long"},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header's seconds"},
    504: {"model": ErrorResponse, "description": "The request ran past the server's deadline"},
}


async def build_request(state: ServiceState, body: GenerateRequest) -> GenerationRequest:
    """Resolve the task's prefix now (a later replace/delete won't touch this request) and check the limits."""
    params = body.parameters.to_sampling(state.settings.default_max_new_tokens)
    return await state.inputs.text_request(
        body.task_id, body.inputs, params, fields=TGI_FIELDS, raw_prompt=body.raw_prompt
    )


def _details(result: GenerationResult) -> GenerateDetails:
    return GenerateDetails(
        finish_reason=result.finish_reason.value,
        generated_tokens=len(result.token_ids),
        prompt_tokens=result.prompt_tokens,
        seed=result.seed,
    )


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(
    body: GenerateRequest, http: Request, state: Annotated[ServiceState, Depends(get_state)]
) -> GenerateResponse:
    request = await build_request(state, body)
    http.state.task_id = body.task_id  # a known task: safe as a metrics label
    result = await state.engine.generate(request)
    state.metrics.observe_generation(body.task_id, result)
    return GenerateResponse(generated_text=result.text, details=_details(result))


@router.post(
    "/generate_stream",
    response_class=StreamingResponse,
    responses={
        **_ERRORS,
        200: {
            "content": {"text/event-stream": {"schema": StreamEvent.model_json_schema()}},
            "description": "Server-sent events, one per token; the last one also carries generated_text and details.",
        },
    },
)
async def generate_stream(
    body: GenerateRequest, http: Request, state: Annotated[ServiceState, Depends(get_state)]
) -> StreamingResponse:
    """TGI-style SSE: every event is `data: {"token": {...}, "generated_text": null, "details": null}`; the last
    token's event carries the full text and details. A client that disconnects cancels its row."""
    request = await build_request(state, body)
    http.state.task_id = body.task_id
    events = state.engine.stream(request)  # raises (429 etc.) before the response starts
    special_ids = frozenset(state.model.tokenizer.all_special_ids)

    async def chunks() -> AsyncIterator[str]:
        pending: StreamToken | None = None  # hold one token back so the last one can carry the final details
        async for event in events:
            if isinstance(event, TokenEvent):
                if pending is not None:
                    yield sse(StreamEvent(token=pending))
                pending = StreamToken(id=event.token_id, text=event.text, special=event.token_id in special_ids)
            else:
                result = event.result
                state.metrics.observe_generation(body.task_id, result)
                yield sse(StreamEvent(token=pending, generated_text=result.text, details=_details(result)))

    return event_stream(chunks(), events, path=http.url.path)
