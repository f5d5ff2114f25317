"""OpenAI-compatible endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

`model` names what to generate with: a stored task id (its prefix rides along as KV, the base model stays frozen) or
the base model's own name (no prefix). A task whose id equals the base model's name shadows the base model.

Semantics, where OpenAI's and TGI's differ:
  - temperature 0 is greedy; an absent temperature means 1.0 (OpenAI's default), i.e. sampling;
  - a matched stop sequence is not part of the returned text (TGI's /generate keeps it);
  - finish_reason is "stop" (EOS or a stop sequence) or "length";
  - usage.prompt_tokens counts the prompt's tokens, not the prefix's virtual tokens;
  - n, best_of, echo, logprobs, penalties, logit_bias, tools... are declared but only their neutral values are
    accepted: anything else is a 422 naming the parameter, never silently ignored.
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (service.api.error_bodies), so the
official clients show the message and raise their usual exception classes from the status code: 404 NotFoundError,
422 UnprocessableEntityError, 429 RateLimitError.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from service.api.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIFinishReason,
    Usage,
    SamplingFields,
)
from service.api.auth import require
from service.api.body_route import CheckedBodyRoute
from service.api.paging import check_prefix, page_limit
from service.api.sse import event_stream, sse
from service.api.state import ServiceState, get_state
from service.engine import TokenEvent
from service.errors import InvalidRequestError, ModelNotFoundError
from service.inputs import ChatTurn, FieldNames
from service.requests import FinishReason, GenerationRequest, GenerationResult, SamplingParams

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1", tags=["openai"], route_class=CheckedBodyRoute, dependencies=[Depends(require("generate"))]
)

State = Annotated[ServiceState, Depends(get_state)]

OWNER = "prefix-serve"
_STARTED = int(time.time())  # the base model's `created`


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error...")
    param: str | None = Field(description="The request field at fault, when there is one.")
    code: str = Field(description="The specific error, e.g. model_not_found, context_length_exceeded.")


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


_ERRORS: dict[int | str, dict] = {
    404: {"model": OpenAIError, "description": "Unknown model (task id)"},
    413: {"model": OpenAIError, "description": "Body over PREFIX_SERVE_MAX_JSON_BODY_BYTES"},
    415: {"model": OpenAIError, "description": "The body is not application/json"},
    422: {"model": OpenAIError, "description": "Bad or unsupported parameters, or prompt too long"},
    429: {"model": OpenAIError, "description": "Queue full; retry after the Retry-After header's seconds"},
    504: {"model": OpenAIError, "description": "The request ran past the server's deadline"},
}


# ------------------------------------------------------------------------------------------------ models


@router.get("/models", response_model=ModelList)
def list_models(
    state: State,
    limit: Annotated[
        int | None, Query(description="Models per page (default list_default_limit, 100; at most list_max_limit).")
    ] = None,
    after: Annotated[
        str | None, Query(description="The previous page's last_id: this page starts after it (OpenAI's cursor).")
    ] = None,
    prefix: Annotated[str, Query(description="Extension: only ids that begin with this.")] = "",
) -> ModelList:
    """The base model (parent null) first, then the stored tasks (parent = the base model) in id order, a page at a
    time: while `has_more`, ask again with `after=<last_id>`."""
    size = page_limit(limit, state.settings)
    check_prefix(prefix)
    base = state.model.name
    with_base = after is None and base.startswith(prefix) and base not in state.registry
    # `after` the base model's own id: the tasks from their start (the base model sorts before every task).
    task_after = None if after is None or (after == base and base not in state.registry) else after
    cards = [_base_card(base)] if with_base else []
    records, has_more = state.registry.page(after=task_after, limit=size - len(cards), prefix=prefix)
    cards += [_task_card(record, base) for record in records]
    return ModelList(
        data=cards, has_more=has_more,
        first_id=cards[0].id if cards else None, last_id=cards[-1].id if cards else None,
    )  # fmt: skip


@router.get("/models/{model:path}", response_model=ModelCard, responses={404: _ERRORS[404]})
def retrieve_model(model: str, state: State) -> ModelCard:
    base = state.model.name
    if model in state.registry:
        return _task_card(state.registry.record(model), base)
    if model == base:
        return _base_card(base)
    raise ModelNotFoundError(model, base)


def _base_card(base: str) -> ModelCard:
    return ModelCard(id=base, created=_STARTED, owned_by=OWNER, parent=None, root=base)


def _task_card(record: PrefixRecord, base: str) -> ModelCard:
    return ModelCard(
        id=record.task_id, created=_unix(record.created_at), owned_by=OWNER, parent=base, root=base,
        prompt_template=record.prompt_template, description=record.description,
    )  # fmt: skip


def _unix(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return _STARTED


# ------------------------------------------------------------------------------------------------ completions


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}},
)
async def completions(body: CompletionRequest, http: Request, state: State) -> Any:
    _reject_unsupported(body, _completion_unsupported(body))
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequestError(
                f"prompt: exactly one prompt per request is supported, got a list of {len(prompt)}", field="prompt"
            )
        prompt = prompt[0]
    params = _sampling(body, body.max_tokens, state.settings.default_max_new_tokens)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    request = await state.inputs.text_request(
        body.model, prompt, params, fields=FieldNames("prompt", "max_tokens"), base_model_allowed=True,
        request_id=completion_id, raw_prompt=body.raw_prompt,
    )
    http.state.task_id = body.model  # a served model (task or base): safe as a metrics label
    created = int(time.time())

    if body.stream:
        def chunk(text: str, finish: OpenAIFinishReason | None) -> str:
            choice = CompletionChoice(text=text, finish_reason=finish)
            return sse(CompletionResponse(id=completion_id, created=created, model=body.model, choices=[choice]))

        def usage_chunk(usage: Usage) -> str:
            empty = CompletionResponse(id=completion_id, created=created, model=body.model, choices=[], usage=usage)
            return sse(empty)

        return _stream(state, request, body, http.url.path, first=None, chunk=chunk, usage_chunk=usage_chunk)

    result = await state.engine.generate(request)
    state.metrics.observe_generation(body.model, result)
    return CompletionResponse(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[CompletionChoice(text=_strip_stop(result, params.stop), finish_reason=_finish(result))],
        usage=_usage(result),
    )


# ------------------------------------------------------------------------------------------------ chat


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}},
)
async def chat_completions(body: ChatCompletionRequest, http: Request, state: State) -> Any:
    _reject_unsupported(body, _chat_unsupported(body))
    if body.max_tokens is not None and body.max_completion_tokens not in (None, body.max_tokens):
        raise InvalidRequestError(
            "max_tokens and max_completion_tokens disagree; send one of them", field="max_completion_tokens"
        )
    max_tokens, max_field = (
        (body.max_completion_tokens, "max_completion_tokens")
        if body.max_completion_tokens is not None
        else (body.max_tokens, "max_tokens")
    )
    params = _sampling(body, max_tokens, state.settings.default_max_new_tokens)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    request = await state.inputs.chat_request(
        body.model, _turns(body), params, fields=FieldNames("messages", max_field), request_id=completion_id,
        raw_prompt=body.raw_prompt,
    )
    http.state.task_id = body.model
    created = int(time.time())

    if body.stream:
        def chunk(text: str | None, finish: OpenAIFinishReason | None) -> str:
            if text is None:  # the opening chunk
                delta = {"role": "assistant", "content": ""}
            else:
                delta = {"content": text} if text else {}
            choice = ChatChunkChoice(delta=delta, finish_reason=finish)
            return sse(ChatCompletionChunk(id=completion_id, created=created, model=body.model, choices=[choice]))

        def usage_chunk(usage: Usage) -> str:
            empty = ChatCompletionChunk(id=completion_id, created=created, model=body.model, choices=[], usage=usage)
            return sse(empty)

        return _stream(
            state, request, body, http.url.path, first=chunk(None, None), chunk=chunk, usage_chunk=usage_chunk
        )

    result = await state.engine.generate(request)
    state.metrics.observe_generation(body.model, result)
    message = AssistantMessage(content=_strip_stop(result, params.stop))
    return ChatCompletionResponse(
        id=completion_id,
        created=created,
        model=body.model,
        choices=[ChatChoice(message=message, finish_reason=_finish(result))],
        usage=_usage(result),
    )


def _turns(body: ChatCompletionRequest) -> list[ChatTurn]:
    turns = []
    for index, message in enumerate(body.messages):
        if message.name is not None:
            # The chat template has no place for it: dropping it silently would change who the model thinks spoke.
            raise InvalidRequestError(
                f"messages[{index}].name: not supported (this server's chat template cannot show it); omit it",
                field=f"messages[{index}].name",
            )
        turns.append(ChatTurn(role=message.role, content=message.text()))
    return turns


# ------------------------------------------------------------------------------------------------ shared


def _completion_unsupported(body: CompletionRequest) -> list[str]:
    problems = []
    if body.echo:
        problems.append("echo=true (only false is supported)")
    if body.logprobs is not None:
        problems.append(f"logprobs={body.logprobs} (log-probabilities are not returned; omit it)")
    if body.best_of not in (None, 1):
        problems.append(f"best_of={body.best_of} (only 1 is supported)")
    if body.suffix is not None:
        problems.append("suffix (insertion is not supported; omit it)")
    return problems


def _chat_unsupported(body: ChatCompletionRequest) -> list[str]:
    problems = []
    if body.logprobs:
        problems.append("logprobs=true (log-probabilities are not returned)")
    if body.top_logprobs not in (None, 0):
        problems.append(f"top_logprobs={body.top_logprobs} (log-probabilities are not returned)")
    if body.tools:
        problems.append("tools (tool calling is not supported)")
    if body.tool_choice not in (None, "none"):
        problems.append(f"tool_choice={json.dumps(body.tool_choice)} (tool calling is not supported)")
    if body.response_format not in (None, {"type": "text"}):
        shown = json.dumps(body.response_format)
        problems.append(f'response_format={shown} (only {{"type": "text"}} is supported)')
    return problems


def _reject_unsupported(body: SamplingFields, extra: list[str]) -> None:
    """One 422 naming every unsupported parameter the request set to a non-neutral value."""
    problems = []
    if body.n not in (None, 1):
        problems.append(f"n={body.n} (only n=1 is supported)")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value not in (None, 0):
            problems.append(f"{name}={value} (not supported; send 0 or omit it, or use repetition_penalty)")
    if body.logit_bias:
        problems.append("logit_bias (not supported; omit it)")
    if body.stream_options is not None and not body.stream:
        problems.append("stream_options (only allowed with stream=true)")
    problems += extra
    if problems:
        fields = [p.split("=")[0].split(" ")[0] for p in problems]
        raise InvalidRequestError("unsupported parameters: " + "; ".join(problems), field=fields[0], fields=fields)


def _sampling(body: SamplingFields, max_tokens: int | None, default_max_tokens: int) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    do_sample = temperature > 0.0
    return SamplingParams(
        max_new_tokens=max_tokens or default_max_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        stop=body.stop_sequences(),
        seed=body.seed,
    )


def _finish(result: GenerationResult) -> OpenAIFinishReason:
    return "length" if result.finish_reason is FinishReason.LENGTH else "stop"


def _usage(result: GenerationResult) -> Usage:
    completion = len(result.token_ids)
    prompt = result.prompt_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _strip_stop(result: GenerationResult, stop: tuple[str, ...]) -> str:
    """The engine cuts the text at the end of the first stop sequence; OpenAI returns it without that sequence."""
    text = result.text
    if result.finish_reason is FinishReason.STOP_SEQUENCE:
        matched = [s for s in stop if text.endswith(s)]
        if matched:
            return text[: len(text) - max(len(s) for s in matched)]
    return text


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters of `text` might be the start of a stop sequence (not safe to stream yet)."""
    hold = 0
    for s in stop:
        for k in range(min(len(s), len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


def _stream(
    state: ServiceState,
    request: GenerationRequest,
    body: SamplingFields,
    path: str,
    *,
    first: str | None,
    chunk: Callable[[str, OpenAIFinishReason | None], str],
    usage_chunk: Callable[[Usage], str],
) -> StreamingResponse:
    """SSE: an optional opening chunk, a chunk per token that adds text, a last chunk with the finish reason, a usage
    chunk if asked for, then `data: [DONE]`. Text that could be the start of a stop sequence is held back until it
    is clear it is not one. A client that disconnects cancels its row (closing the engine iterator does that)."""
    events = state.engine.stream(request, with_text=True)  # raises (429 etc.) before the response starts
    stop = request.params.stop
    model = body.model
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def chunks() -> AsyncIterator[str]:
        text = ""  # everything the engine has sent so far
        sent = 0  # characters of `text` already streamed
        if first is not None:
            yield first
        async for event in events:
            if isinstance(event, TokenEvent):
                text += event.text
                safe = len(text) - _held_back(text, stop)
                if safe > sent:
                    yield chunk(text[sent:safe], None)
                    sent = safe
                continue
            result = event.result
            state.metrics.observe_generation(model, result)
            final = _strip_stop(result, stop)
            if len(final) > sent and final.startswith(text[:sent]):
                yield chunk(final[sent:], None)
            yield chunk("", _finish(result))
            if include_usage:
                yield usage_chunk(_usage(result))
            yield "data: [DONE]\n\n"

    return event_stream(chunks(), events, path=path)


