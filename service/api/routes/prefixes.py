"""Prefix management: upload (PEFT adapter files), list, show, delete. Prefixes enter the service only here."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile, status

from service.api.auth import require
from service.api.body_route import CheckedBodyRoute
from service.api.schemas import ErrorResponse, PrefixInfo, PrefixList, PrefixState, PrefixUploadResponse
from service.api.state import ServiceState, get_state
from service.errors import InvalidPrefixError, InvalidRequestError, PayloadTooLargeError, ServiceError
from service.registry import PrefixRecord

router = APIRouter(prefix="/prefixes", tags=["prefixes"], route_class=CheckedBodyRoute)

State = Annotated[ServiceState, Depends(get_state)]
ADMIN = [Depends(require("admin"))]  # upload, replace, delete
READ = [Depends(require("generate"))]


def _info(record: PrefixRecord) -> PrefixInfo:
    return PrefixInfo(
        task_id=record.task_id,
        num_virtual_tokens=record.num_virtual_tokens,
        bytes=record.bytes,
        sha256=record.sha256,
        created_at=record.created_at,
        base_model_name_or_path=record.base_model_name_or_path,
    )


def _read_capped(stream: BinaryIO, field: str, cap: int) -> bytes:
    """Read an uploaded file but never more than cap + 1 bytes, so an oversized upload is refused cheaply."""
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise PayloadTooLargeError(f"{field}: larger than the {cap}-byte limit", field=field, limit=cap)
    if not data:
        raise InvalidPrefixError(field, "a non-empty file", "0 bytes")
    return data


UPLOAD_FIELDS = ("task_id", "replace", "adapter_config", "adapter_model")


def _check_form_fields(names: list[str]) -> None:
    """Each upload field at most once, and nothing else: with a repeated `task_id` the last one used to win silently,
    and a second `adapter_model` was dropped unseen."""
    counts = Counter(names)
    repeated = sorted(name for name, n in counts.items() if n > 1)
    if repeated:
        raise InvalidRequestError(
            f"form field(s) {repeated} sent more than once; send each of {list(UPLOAD_FIELDS)} at most once",
            field=repeated[0],
        )
    unknown = sorted(name[:64] for name in counts if name not in UPLOAD_FIELDS)
    if unknown:
        raise InvalidRequestError(
            f"unexpected form field(s) {unknown}; an upload has only {list(UPLOAD_FIELDS)}", field=unknown[0]
        )


@router.post(
    "",
    response_model=PrefixUploadResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": PrefixUploadResponse, "description": "Replaced an existing prefix"},
        409: {"model": ErrorResponse, "description": "Task exists and replace is false"},
        413: {"model": ErrorResponse, "description": "A file is over its size cap"},
        415: {"model": ErrorResponse, "description": "The body is not multipart/form-data"},
        422: {"model": ErrorResponse, "description": "The adapter does not fit the served model"},
    },
    dependencies=ADMIN,
)
async def upload_prefix(
    state: State,
    request: Request,
    response: Response,
    task_id: Annotated[str, Form(description="Task id the prefix is served under.")],
    adapter_config: Annotated[UploadFile, File(description="PEFT adapter_config.json")],
    adapter_model: Annotated[UploadFile, File(description="PEFT adapter_model.safetensors")],
    replace: Annotated[bool, Form(description="Overwrite an existing prefix of this task.")] = False,
) -> PrefixUploadResponse:
    settings = state.settings
    try:
        _check_form_fields([name for name, _ in (await request.form()).multi_items()])  # parsed already: cached
        # Reading the spooled files, validating and the fsynced write all block: keep them off the event loop.
        config_bytes = await asyncio.to_thread(
            _read_capped, adapter_config.file, "adapter_config", settings.max_config_bytes
        )
        weights_bytes = await asyncio.to_thread(
            _read_capped, adapter_model.file, "adapter_model", settings.max_prefix_bytes
        )
        record, created, warnings = await asyncio.to_thread(
            state.registry.put, task_id, config_bytes, weights_bytes, replace=replace
        )
    except ServiceError as exc:
        state.metrics.uploads.labels(exc.code).inc()
        raise
    state.metrics.uploads.labels("created" if created else "replaced").inc()
    if not created:
        response.status_code = status.HTTP_200_OK
    return PrefixUploadResponse(**_info(record).model_dump(), warnings=warnings)


def _state(state: ServiceState, record: PrefixRecord) -> PrefixState:
    return PrefixState(**_info(record).model_dump(), tier=state.registry.tier(record.task_id))


@router.get("", response_model=PrefixList, dependencies=READ)
def list_prefixes(state: State) -> PrefixList:
    return PrefixList(prefixes=[_state(state, r) for r in state.registry.list()])


@router.get("/{task_id}", response_model=PrefixState, responses={404: {"model": ErrorResponse}}, dependencies=READ)
def get_prefix(task_id: str, state: State) -> PrefixState:
    return _state(state, state.registry.record(task_id))


@router.delete(
    "/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"model": ErrorResponse}}, dependencies=ADMIN
)
def delete_prefix(task_id: str, state: State) -> Response:
    state.registry.delete(task_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
