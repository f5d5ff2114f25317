"""POST /generate and /generate_stream: one prompt, one task, TGI-style responses. Requests are built by the shared
input processor (`service.inputs`): this module only maps TGI's JSON to it and the engine's results back.

`generate_response` and `stream_response` are the one code path of TGI-style generation: the per-task routes
(`service.api.routes.tasks`, the task in the URL) call them too."""

from __future__ import annotations

from contextlib import aclosing
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.api.auth import require
from service.api.body_route import CheckedBodyRoute
from service.api.schemas import (
    ErrorResponse,
    GenerateDetails,
    GeneratedToken,
    GenerateInputs,
    GenerateRequest,
    GenerateResponse,
    GenerateTokenDetails,
    StreamEvent,
    StreamToken,
)
from service.api.sse import event_stream, sse
from service.api.state import ServiceState, get_state
from service.engine import FinalEvent, TokenEvent
from service.errors import InvalidRequestError
from service.inputs import TGI_FIELDS
from service.requests import GenerationRequest, GenerationResult

router = APIRouter(tags=["generate"], route_class=CheckedBodyRoute, dependencies=[Depends(require("generate"))])

ERRORS: dict[int | str, dict] = {
    404: {"model": ErrorResponse, "description": "Unknown task"},
    413: {"model": ErrorResponse, "description": "Body over PREFIX_SERVE_MAX_JSON_BODY_BYTES"},
    415: {"model": ErrorResponse, "description": "The body is not application/json"},
    422: {"model": ErrorResponse, "description": "Bad or unsupported parameters, or prompt too long"},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header's seconds"},
    504: {"model": ErrorResponse, "description": "The request ran past the server's deadline"},
}

STREAM_CONTENT: dict[int | str, dict] = {
    200: {
        "content": {"text/event-stream": {"schema": StreamEvent.model_json_schema()}},
        "description": "Server-sent events, one per token; the last one also carries generated_text and details.",
    },
}


async def build_request(state: ServiceState, task_id: str, body: GenerateInputs) -> GenerationRequest:
    """Refuse parameters the engine does not honour, resolve the task's prefix now (a later replace/delete won't
    touch this request) and check the limits."""
    problems = body.parameters.unsupported(task_id)
    if problems:
        fields = [f"parameters.{name}" for name, _ in problems]
        raise InvalidRequestError(
            "unsupported parameters: " + "; ".join(why for _, why in problems), field=fields[0], fields=fields
        )
    params = body.parameters.to_sampling(state.settings.default_max_new_tokens)
    return await state.inputs.text_request(
        task_id, body.inputs, params, fields=TGI_FIELDS, raw_prompt=body.raw_prompt
    )


def _details(result: GenerationResult) -> GenerateDetails:
    return GenerateDetails(
        finish_reason=result.finish_reason.value,
        generated_tokens=len(result.token_ids),
        prompt_tokens=result.prompt_tokens,
        seed=result.seed,
    )


def _output_text(body: GenerateInputs, result: GenerationResult) -> str:
    """TGI's return_full_text: the inputs as the client sent them, then the new text."""
    return body.inputs + result.text if body.parameters.return_full_text else result.text


async def generate_response(
    state: ServiceState, http: Request, task_id: str, body: GenerateInputs
) -> GenerateResponse:
    """One blocking generation, for /generate and POST /tasks/{task_id}[/generate]."""
    request = await build_request(state, task_id, body)
    http.state.task_id = task_id  # a known task: safe as a metrics label
    tokens: list[GeneratedToken] | None = None
    if body.parameters.details:
        # Per-token details need each token's text, which only the engine's streaming events carry.
        special_ids = frozenset(state.model.tokenizer.all_special_ids)
        tokens = []
        result: GenerationResult | None = None
        async with aclosing(state.engine.stream(request, with_text=True)) as events:
            async for event in events:
                if isinstance(event, TokenEvent):
                    special = event.token_id in special_ids
                    tokens.append(GeneratedToken(id=event.token_id, text=event.text, special=special))
                elif isinstance(event, FinalEvent):
                    result = event.result
        if result is None:
            raise RuntimeError("engine stream ended without a result")
    else:
        result = await state.engine.generate(request)
    state.metrics.observe_generation(task_id, result)
    summary = _details(result)
    details = summary if tokens is None else GenerateTokenDetails(**summary.model_dump(), tokens=tokens)
    return GenerateResponse(generated_text=_output_text(body, result), details=details)


async def stream_response(state: ServiceState, http: Request, task_id: str, body: GenerateInputs) -> StreamingResponse:
    """TGI-style SSE, for /generate_stream and the per-task streams: every event is `data: {"token": {...},
    "generated_text": null, "details": null}`; the last token's event carries the full text and details. A client
    that disconnects cancels its row."""
    request = await build_request(state, task_id, body)
    http.state.task_id = task_id
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
                state.metrics.observe_generation(task_id, result)
                text = _output_text(body, result)
                yield sse(StreamEvent(token=pending, generated_text=text, details=_details(result)))

    return event_stream(chunks(), events, path=http.url.path)


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(
    body: GenerateRequest, http: Request, state: Annotated[ServiceState, Depends(get_state)]
) -> GenerateResponse:
    return await generate_response(state, http, body.task_id, body)


@router.post("/generate_stream", response_class=StreamingResponse, responses={**ERRORS, **STREAM_CONTENT})
async def generate_stream(
    body: GenerateRequest, http: Request, state: Annotated[ServiceState, Depends(get_state)]
) -> StreamingResponse:
    return await stream_response(state, http, body.task_id, body)
