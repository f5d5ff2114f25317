"""POST /generate and /generate_stream: one prompt, one task, TGI-style responses."""

from __future__ import annotations

import json
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service import templates
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
from service.prefix import TaskPrefix
from service.requests import GenerationRequest, GenerationResult, SamplingParams

router = APIRouter(tags=["generate"])

_ERRORS: dict[int | str, dict] = {
    404: {"model": ErrorResponse, "description": "Unknown task"},
    422: {"model": ErrorResponse, "description": "Bad parameters or prompt too long"},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header's seconds"},
    504: {"model": ErrorResponse, "description": "The request ran past the server's deadline"},
}


def build_request(state: ServiceState, body: GenerateRequest) -> GenerationRequest:
    """Resolve the task's prefix now (a later replace/delete won't touch this request) and check the limits."""
    params = body.parameters.to_sampling(state.settings.default_max_new_tokens)
    prefix, record = state.registry.lookup(body.task_id)
    # --- task template (issue 12, service/templates.py): fill the task's prompt_template unless raw_prompt ---
    prompt = templates.render(record.prompt_template, body.inputs, raw=body.raw_prompt)
    prompt_ids = state.model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return checked_request(state, list(prompt_ids), prefix, params)


def checked_request(
    state: ServiceState,
    prompt_ids: list[int],
    prefix: TaskPrefix | None,
    params: SamplingParams,
    *,
    prompt_field: str = "inputs",
    max_field: str = "max_new_tokens",
) -> GenerationRequest:
    """Apply every request limit (documented in README's configuration table); each failure is a 422 naming the
    field as the client sent it (`prompt_field`, `max_field`: the OpenAI routes say prompt/messages, max_tokens)."""
    settings = state.settings
    if params.max_new_tokens > settings.max_new_tokens_limit:
        raise InvalidRequestError(
            f"{max_field}: at most {settings.max_new_tokens_limit}, got {params.max_new_tokens}",
            field=max_field, limit=settings.max_new_tokens_limit,
        )
    if len(params.stop) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"stop: at most {settings.max_stop_sequences} stop sequences, got {len(params.stop)}",
            field="stop", limit=settings.max_stop_sequences,
        )
    too_long = [s for s in params.stop if len(s) > settings.max_stop_sequence_chars]
    if too_long:
        raise InvalidRequestError(
            f"stop: each stop sequence may have at most {settings.max_stop_sequence_chars} characters, "
            f"got one of {len(too_long[0])}",
            field="stop", limit=settings.max_stop_sequence_chars,
        )
    if not prompt_ids:
        raise InvalidRequestError(f"{prompt_field}: the prompt encodes to zero tokens", field=prompt_field)
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise InvalidRequestError(
            f"{prompt_field}: the prompt has {len(prompt_ids)} tokens, more than the limit of "
            f"{settings.max_prompt_tokens}",
            field=prompt_field, limit=settings.max_prompt_tokens,
        )
    virtual_tokens = prefix.num_virtual_tokens if prefix is not None else 0
    total = len(prompt_ids) + virtual_tokens + params.max_new_tokens
    limit = state.model.max_context
    if total > limit:
        raise RequestTooLongError(
            f"{prompt_field} ({len(prompt_ids)} tokens) + prefix ({virtual_tokens} virtual tokens) + "
            f"{max_field} ({params.max_new_tokens}) = {total} exceeds the model's context of {limit} tokens",
            prompt_tokens=len(prompt_ids),
            num_virtual_tokens=virtual_tokens,
            max_new_tokens=params.max_new_tokens,
            max_context=limit,
        )
    return GenerationRequest(prompt_ids=prompt_ids, prefix=prefix, params=params)


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
    request = build_request(state, body)
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
    request = build_request(state, body)
    http.state.task_id = body.task_id
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
                    state.metrics.observe_generation(body.task_id, result)
                    yield _sse(StreamEvent(token=pending, generated_text=result.text, details=_details(result)))
        except ServiceError as exc:  # e.g. the deadline passed mid-generation: the status line is already sent
            yield f"data: {json.dumps(exc.to_json())}\n\n"
        finally:
            await events.aclose()

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(event: StreamEvent) -> str:
    return f"data: {event.model_dump_json()}\n\n"
