"""A TGI base URL per task: `/tasks/{task_id}`. Hugging Face's `InferenceClient(model=URL).text_generation(...)` (and
LangChain's `HuggingFaceEndpoint`, which wraps it) posts TGI's body `{"inputs", "parameters", "stream"}` to the URL it
was given and reads `/info` and `/health` beneath it; with the task in the URL, every task is such an endpoint.

The routes run `/generate`'s code path (`generate_response` / `stream_response`): same input processing, templates,
limits, auth and errors. An unknown task is a 404 from the input path, as on /generate."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service import __version__
from service.api.auth import require
from service.api.body_route import CheckedBodyRoute
from service.api.routes.generate import ERRORS, STREAM_CONTENT, generate_response, stream_response
from service.api.schemas import GenerateInputs, GenerateResponse, TaskEndpointInfo, TaskGenerateRequest, TaskHealth
from service.api.state import ServiceState, get_state
from service.registry import PrefixRecord

router = APIRouter(
    prefix="/tasks/{task_id}",
    tags=["tasks (TGI per task)"],
    route_class=CheckedBodyRoute,
    dependencies=[Depends(require("generate"))],
)

State = Annotated[ServiceState, Depends(get_state)]

_JSON_OR_STREAM: dict[int | str, dict] = {
    200: {
        "content": {"text/event-stream": STREAM_CONTENT[200]["content"]["text/event-stream"]},
        "description": "The JSON of /generate, or with stream=true the server-sent events of /generate_stream.",
    },
}


@router.post("", response_model=GenerateResponse, responses={**ERRORS, **_JSON_OR_STREAM})
async def task_endpoint(task_id: str, body: TaskGenerateRequest, http: Request, state: State) -> Any:
    """TGI's `POST /` for this task: `stream: false` answers as /generate, `stream: true` as /generate_stream."""
    if body.stream:
        return await stream_response(state, http, task_id, body)
    return await generate_response(state, http, task_id, body)


# A client given the URL with a trailing slash posts there; redirect_slashes is off (see create_app), so say it here.
router.add_api_route(
    "/", task_endpoint, methods=["POST"], response_model=GenerateResponse, include_in_schema=False
)


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def task_generate(task_id: str, body: GenerateInputs, http: Request, state: State) -> GenerateResponse:
    """/generate with the task in the URL."""
    return await generate_response(state, http, task_id, body)


@router.post("/generate_stream", response_class=StreamingResponse, responses={**ERRORS, **STREAM_CONTENT})
async def task_generate_stream(task_id: str, body: GenerateInputs, http: Request, state: State) -> StreamingResponse:
    """/generate_stream with the task in the URL."""
    return await stream_response(state, http, task_id, body)


@router.get("/info", response_model=TaskEndpointInfo, responses={404: ERRORS[404], 422: ERRORS[422]})
def task_info(task_id: str, state: State) -> TaskEndpointInfo:
    """TGI's /info for this task: the base model, the limits a request for this task meets, and the task."""
    record = _record(state, task_id)
    settings, model = state.settings, state.model
    max_input, total = _request_limits(state, record.num_virtual_tokens)
    encoder_decoder = model.geometry.is_encoder_decoder
    return TaskEndpointInfo(
        model_id=model.name,
        model_dtype=str(model.dtype),
        model_device_type=model.device.type,
        model_pipeline_tag="text2text-generation" if encoder_decoder else "text-generation",
        max_concurrent_requests=settings.max_running_rows + settings.max_waiting,
        max_best_of=1,
        max_stop_sequences=settings.max_stop_sequences,
        max_input_tokens=max_input,
        max_total_tokens=total,
        max_batch_total_tokens=settings.max_kv_tokens,
        max_batch_size=settings.max_running_rows,
        max_client_batch_size=1,
        validation_workers=settings.input_threads,
        router="prefix-serve",
        version=__version__,
        task_id=record.task_id,
        num_virtual_tokens=record.num_virtual_tokens,
        prefix_sha256=record.sha256,
        prompt_template=record.prompt_template,
        description=record.description,
    )


def _request_limits(state: ServiceState, virtual_tokens: int) -> tuple[int, int]:
    """(most prompt tokens, most prompt + new tokens) of one request of a task whose prefix has `virtual_tokens`, as
    the input path checks them; one request alone must also fit the engine's KV budget (prefix + prompt + new)."""
    settings, geometry = state.settings, state.model.geometry
    budget = max(0, settings.max_kv_tokens - virtual_tokens)
    if not geometry.is_encoder_decoder:  # the prefix occupies part of the one context
        total = min(budget, max(0, geometry.max_positions - virtual_tokens))
        return min(settings.max_prompt_tokens, max(0, total - 1)), total
    # Encoder-decoder: the prompt has the encoder's positions, prefix + start token + new tokens the decoder's.
    max_input, max_new = settings.max_prompt_tokens, settings.max_new_tokens_limit
    if geometry.bounded_positions:
        max_input = min(max_input, geometry.max_positions)
        max_new = min(max_new, max(0, geometry.max_positions - virtual_tokens - 1))
    total = min(budget, max_input + max_new)
    return min(max_input, max(0, total - 1)), total


@router.get("/health", response_model=TaskHealth, responses={404: ERRORS[404], 422: ERRORS[422]})
def task_health(task_id: str, state: State) -> TaskHealth:
    """200 while the task is stored (`InferenceClient.health_check()` reads this), 404 otherwise."""
    _record(state, task_id)
    return TaskHealth(status="ok", task_id=task_id)


def _record(state: ServiceState, task_id: str) -> PrefixRecord:
    """The task's record; a malformed id is a 422 naming the pattern and an unknown one a 404, as everywhere else."""
    return state.registry.record(task_id)
