"""POST /generate: one prompt, one task, TGI-style response."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.schemas import ErrorResponse, GenerateDetails, GenerateRequest, GenerateResponse
from service.api.state import ServiceState, get_state
from service.errors import InvalidRequestError, RequestTooLongError
from service.requests import GenerationRequest

router = APIRouter(tags=["generate"])

_ERRORS: dict[int | str, dict] = {
    404: {"model": ErrorResponse, "description": "Unknown task"},
    422: {"model": ErrorResponse, "description": "Bad parameters or prompt too long"},
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


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(body: GenerateRequest, state: Annotated[ServiceState, Depends(get_state)]) -> GenerateResponse:
    request = build_request(state, body)
    result = await state.engine.generate(request)
    return GenerateResponse(
        generated_text=result.text,
        details=GenerateDetails(
            finish_reason=result.finish_reason.value,
            generated_tokens=len(result.token_ids),
            prompt_tokens=result.prompt_tokens,
            seed=result.seed,
        ),
    )
