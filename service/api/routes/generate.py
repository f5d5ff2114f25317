"""POST /generate and /generate_stream: one prompt, one task, TGI-style responses."""

from __future__ import annotations

import json
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from service.api.schemas import (
    ErrorResponse,
    GenerateDetails,
    GenerateRequest,
    GenerateResponse,
    StreamEvent,
    StreamToken,
)
from service.api.state import ServiceState, get_state
from service.engine import TokenEvent
from service.errors import InvalidRequestError, RequestTooLongError, ServiceError
from service.requests import GenerationRequest, GenerationResult

router = APIRouter(tags=["generate"])

_ERRORS: dict[int | str, dict] = {
    404: {"model": ErrorResponse, "description": "Unknown task"},
    422: {"model": ErrorResponse, "description": "Bad parameters or prompt too long"},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header's seconds"},
}


def build_request(state: ServiceState, body: GenerateRequest) -> GenerationRequest:
    """Resolve the task's prefix now (a later replace/delete won't touch this request) and check the limits."""
    settings = state.settings
    params = body.parameters.to_sampling(settings.default_max_new_tokens)
    if params.max_new_tokens > settings.max_new_tokens_limit:
        raise InvalidRequestError(
            f"parameters.max_new_tokens: at most {settings.max_new_tokens_limit}, got {params.max_new_tokens}",
            field="parameters.max_new_tokens",
        )
    prefix = state.registry.get(body.task_id)
    prompt_ids = state.model.tokenizer(body.inputs, add_special_tokens=True)["input_ids"]
    if not prompt_ids:
        raise InvalidRequestError("inputs: the prompt encodes to zero tokens", field="inputs")
    total = len(prompt_ids) + prefix.num_virtual_tokens + params.max_new_tokens
    limit = state.model.max_context
    if total > limit:
        raise RequestTooLongError(
            f"prompt ({len(prompt_ids)} tokens) + prefix ({prefix.num_virtual_tokens} virtual tokens) + "
            f"max_new_tokens ({params.max_new_tokens}) = {total} exceeds the model's context of {limit} tokens",
            prompt_tokens=len(prompt_ids),
            num_virtual_tokens=prefix.num_virtual_tokens,
            max_new_tokens=params.max_new_tokens,
            max_context=limit,
        )
    return GenerationRequest(prompt_ids=list(prompt_ids), prefix=prefix, params=params)


def _details(result: GenerationResult) -> GenerateDetails:
    return GenerateDetails(
        finish_reason=result.finish_reason.value,
        generated_tokens=len(result.token_ids),
        prompt_tokens=result.prompt_tokens,
        seed=result.seed,
    )


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, state: Annotated[ServiceState, Depends(get_state)]) -> GenerateResponse:
    request = build_request(state, body)
    result = await state.engine.generate(request)
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
    body: GenerateRequest, state: Annotated[ServiceState, Depends(get_state)]
) -> StreamingResponse:
    """TGI-style SSE: every event is `data: {"token": {...}, "generated_text": null, "details": null}`; the last
    token's event carries the full text and details. A client that disconnects cancels its row."""
    request = build_request(state, body)
    events = state.engine.stream(request)  # raises (429 etc.) before the response starts
    special_ids = state.model.tokenizer.all_special_ids

    async def sse() -> AsyncIterator[str]:
        pending: StreamToken | None = None  # hold one token back so the last one can carry the final details
        try:
            async for event in events:
                if isinstance(event, TokenEvent):
                    if pending is not None:
                        yield _sse(StreamEvent(token=pending))
                    pending = StreamToken(id=event.token_id, text=event.text, special=event.token_id in special_ids)
                else:
                    result = event.result
                    yield _sse(StreamEvent(token=pending, generated_text=result.text, details=_details(result)))
        except ServiceError as exc:  # e.g. the deadline passed mid-generation: the status line is already sent
            yield f"data: {json.dumps(exc.to_json())}\n\n"
        finally:
            await events.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(event: StreamEvent) -> str:
    return f"data: {event.model_dump_json()}\n\n"
