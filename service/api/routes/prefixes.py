"""Prefix management: upload (PEFT adapter files, or a text the model turns into a prefix), list, show, download,
delete. Prefixes enter the service only here."""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import threading
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, BinaryIO, Callable, Iterator

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile, status
from fastapi.responses import StreamingResponse

from service.api.auth import require
from service.api.body_route import CheckedBodyRoute
from service.api.paging import check_prefix, decode_cursor, encode_cursor, page_limit
from service.api.forms import UploadFormLimits
from service.api.schemas import (
    BulkImportResponse,
    BulkTaskResult,
    ErrorResponse,
    PrefixInfo,
    PrefixList,
    PrefixState,
    PrefixUploadResponse,
)
from service.api.state import ServiceState, get_state
from service.bulk_archive import (
    ArchiveLimits,
    TaskMembers,
    open_archive,
    read_task,
    scan_archive,
    tar_stream,
    task_json_cap,
)
from service.compute_thread import run_in_fresh_thread
from service.errors import (
    InvalidPrefixError,
    InvalidRequestError,
    NotAvailableHereError,
    PayloadTooLargeError,
    ServiceError,
    TaskExistsError,
    TaskNotFoundError,
    UnsupportedMediaTypeError,
)
from service.registry import PrefixRecord, TaskInfo, validate_task_id
from service.templates import validate_description, validate_template
from service.text_prefix import check_text, make_text_adapter

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/prefixes", tags=["prefixes"], route_class=CheckedBodyRoute)

State = Annotated[ServiceState, Depends(get_state)]
# Upload, replace, delete, and download: a download carries a text task's text (system prompts, customer
# instructions) and any task's trained weights, a customer's asset, so reading it needs what writing it does.
ADMIN = [Depends(require("admin"))]
READ = [Depends(require("generate"))]  # the list and one task's record (never its text or weights)


def _info(record: PrefixRecord) -> PrefixInfo:
    return PrefixInfo(
        task_id=record.task_id,
        num_virtual_tokens=record.num_virtual_tokens,
        bytes=record.bytes,
        sha256=record.sha256,
        created_at=record.created_at,
        base_model_name_or_path=record.base_model_name_or_path,
        prompt_template=record.prompt_template,
        description=record.description,
        source=record.source,
    )


def _read_capped(stream: BinaryIO, field: str, cap: int) -> bytes:
    """Read an uploaded file but never more than cap + 1 bytes, so an oversized upload is refused cheaply."""
    data = stream.read(cap + 1)
    if len(data) > cap:
        raise PayloadTooLargeError(f"{field}: larger than the {cap}-byte limit", field=field, limit=cap)
    if not data:
        raise InvalidPrefixError(field, "a non-empty file", "0 bytes")
    return data


UPLOAD_FIELDS = (
    "task_id", "replace", "adapter_config", "adapter_model", "text", "prompt_template", "description"
)  # fmt: skip


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
        413: {"model": ErrorResponse, "description": "A file is over its size cap, or the text over its token limit"},
        415: {"model": ErrorResponse, "description": "The body is not a form"},
        501: {"model": ErrorResponse, "description": "A text task on the Ray ingress (it holds no weights)"},
        422: {"model": ErrorResponse, "description": "The adapter does not fit the served model, or a bad field"},
    },
    dependencies=ADMIN,
)
async def upload_prefix(
    state: State,
    request: Request,
    response: Response,
    task_id: Annotated[str, Form(description="Task id the prefix is served under.")],
    adapter_config: Annotated[UploadFile | None, File(description="PEFT adapter_config.json")] = None,
    adapter_model: Annotated[UploadFile | None, File(description="PEFT adapter_model.safetensors")] = None,
    text: Annotated[
        str | None,
        Form(description="Instead of adapter files: a text (an instruction, a few-shot block) the frozen model reads "
             "once; its per-layer K/V become the prefix (V = its token count)."),
    ] = None,
    prompt_template: Annotated[
        str | None, Form(description="How requests are wrapped: a string with exactly one {inputs} slot.")
    ] = None,
    description: Annotated[str | None, Form(description="A short description of the task.")] = None,
    replace: Annotated[bool, Form(description="Overwrite an existing prefix of this task.")] = False,
) -> PrefixUploadResponse:
    try:
        form = await request.form()  # parsed already (service.api.forms): cached
        _check_form_fields([name for name, _ in form.multi_items()])
        if text is None and "text" in form:  # FastAPI reads an empty field as absent: it is a blank text
            text = ""
        # Reading the spooled files, a text task's forward pass, validating and the fsynced write all block: keep
        # them off the event loop.
        record, created, warnings = await asyncio.to_thread(
            run_in_fresh_thread, _store, state, task_id, adapter_config, adapter_model, text, prompt_template, description, replace
        )
    except ServiceError as exc:
        state.metrics.uploads.labels(exc.code).inc()
        raise
    state.metrics.uploads.labels("created" if created else "replaced").inc()
    if not created:
        response.status_code = status.HTTP_200_OK
    return PrefixUploadResponse(**_info(record).model_dump(), warnings=warnings)


def _store(
    state: ServiceState,
    task_id: str,
    adapter_config: UploadFile | None,
    adapter_model: UploadFile | None,
    text: str | None,
    prompt_template: str | None,
    description: str | None,
    replace: bool,
) -> tuple[PrefixRecord, bool, list[str]]:
    """Validate the fields, make the adapter (read the files, or compute it from the text) and store it."""
    has_files = adapter_config is not None or adapter_model is not None

    def read_files() -> tuple[bytes, bytes]:
        for name, part in (("adapter_config", adapter_config), ("adapter_model", adapter_model)):
            if part is None:
                raise _missing(name)
        assert adapter_config is not None and adapter_model is not None
        return (
            _read_capped(adapter_config.file, "adapter_config", state.settings.max_config_bytes),
            _read_capped(adapter_model.file, "adapter_model", state.settings.max_prefix_bytes),
        )

    return store_task(
        state, task_id, read_files if has_files else None, text, prompt_template, description, replace
    )  # fmt: skip


def _missing(name: str) -> InvalidPrefixError:
    return InvalidPrefixError(
        name, "a file", "nothing",
        message=f"{name}: missing; send adapter_config and adapter_model (a PEFT adapter), or a text field instead",
    )  # fmt: skip


def store_task(
    state: ServiceState,
    task_id: str,
    files: Callable[[], tuple[bytes, bytes]] | None,
    text: str | None,
    prompt_template: str | None,
    description: str | None,
    replace: bool,
) -> tuple[PrefixRecord, bool, list[str]]:
    """Store one task, from its adapter files (config, weights) or from a text: the one path of POST /prefixes and
    of each task of POST /prefixes/bulk. `files` reads (config, weights) once the fields are checked. Blocks (a
    text's forward, the probe, fsyncs): call it off the event loop."""
    settings = state.settings
    validate_task_id(task_id)
    info = TaskInfo(
        prompt_template=validate_template(prompt_template, max_chars=settings.max_template_chars),
        description=validate_description(description, max_chars=settings.max_description_chars),
    )
    if text is not None and files is not None:
        raise InvalidPrefixError(
            "text", "either adapter files or a text", "both",
            message="send either the adapter files (adapter_config + adapter_model) or a text, not both",
        )  # fmt: skip
    if text is not None:
        check_text(text)  # blank, or a NUL: before anything is computed
        if state.model.geometry.is_encoder_decoder:
            raise InvalidPrefixError(
                "text", "adapter files (this server runs an encoder-decoder model)", "a text",
                message=(
                    "text: tasks made from text need a decoder-only model (a text's K/V are the prefix it would be); "
                    f"this server runs an encoder-decoder model ({state.model.geometry.model_type}): upload adapter "
                    "files (PEFT SEQ_2_SEQ_LM, or a full prefix from `prefix-serve train`)"
                ),
            )  # fmt: skip
        if _without_weights(state):
            raise NotAvailableHereError(
                "text: tasks made from text need the model's weights, and this Ray Serve ingress holds none; make the "
                "task on a single-process server on the same store (PREFIX_SERVE_SHARED_PREFIX_STORE=true, same "
                "--prefix-dir: the deployment sees it at once), or upload its adapter files",
                field="text",
            )
        if not replace and task_id in state.registry:  # fail before the forward pass; re-checked by put
            raise TaskExistsError(task_id)
        made = make_text_adapter(
            state.model.model, state.model.tokenizer, state.model.geometry, text,
            base_model_name_or_path=state.model.name, max_tokens=settings.max_text_task_tokens,
            chars_per_token=state.inputs.chars_per_token,  # the prompts' bound: one rule for every text read
        )  # fmt: skip
        config_bytes, weights_bytes = made.config_bytes, made.weights_bytes
        info = TaskInfo(prompt_template=info.prompt_template, description=info.description, source="text", text=text)
    else:
        if files is None:
            raise _missing("adapter_config")
        config_bytes, weights_bytes = files()
    return state.registry.put(task_id, config_bytes, weights_bytes, replace=replace, info=info)


def _without_weights(state: ServiceState) -> bool:
    """The Ray ingress's model is a skeleton on the meta device (service/scaleout/ingress.py)."""
    parameter = next(state.model.model.parameters(), None)
    return parameter is not None and parameter.device.type == "meta"


def _state(state: ServiceState, record: PrefixRecord) -> PrefixState:
    return PrefixState(**_info(record).model_dump(), tier=state.registry.tier(record.task_id))


@router.get("", response_model=PrefixList, responses={422: {"model": ErrorResponse}}, dependencies=READ)
def list_prefixes(
    state: State,
    limit: Annotated[
        int | None, Query(description="Tasks per page (default list_default_limit, 100; at most list_max_limit, 1000).")
    ] = None,
    cursor: Annotated[str | None, Query(description="The previous page's next_cursor; omit for the first page.")] = None,
    prefix: Annotated[str, Query(description="Only task ids that begin with this.")] = "",
) -> PrefixList:
    """One page of the stored tasks in task-id order; follow `next_cursor` until it is null."""
    size = page_limit(limit, state.settings)
    check_prefix(prefix)
    after = decode_cursor(cursor, prefix) if cursor is not None else None
    records, has_more = state.registry.page(after=after, limit=size, prefix=prefix)
    next_cursor = encode_cursor(records[-1].task_id, prefix) if has_more and records else None
    return PrefixList(prefixes=[_state(state, r) for r in records], next_cursor=next_cursor)


# ------------------------------------------------------------------------------------------- bulk import and export

_TAR_MEDIA_TYPES = ("application/x-tar", "application/tar", "application/octet-stream")
_SPOOL_WRITE_BYTES = 1 << 20  # body chunks are gathered to this size, then written off the event loop


@router.post(
    "/bulk",
    response_model=BulkImportResponse,
    responses={
        413: {"model": ErrorResponse, "description": "Body over max_bulk_body_bytes, or more than max_bulk_tasks"},
        415: {"model": ErrorResponse, "description": "The body is not a tar"},
        422: {"model": ErrorResponse, "description": "Not a tar, or a member that could escape its task folder"},
    },
    dependencies=ADMIN,
)
async def bulk_import(
    state: State,
    request: Request,
    replace: Annotated[bool, Query(description="Overwrite tasks that exist (else each is a 409 error).")] = False,
) -> BulkImportResponse:
    """Store many tasks from one uncompressed tar of task folders (`<task_id>/adapter_config.json`,
    `<task_id>/adapter_model.safetensors`, optional `<task_id>/task.json`), each exactly as POST /prefixes would,
    by `bulk_workers` threads. One task's error is reported in its result and does not stop the others."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in _TAR_MEDIA_TYPES:
        shown = media[:100] or "none"
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/x-tar for this route, got {shown}; send an uncompressed tar of task "
            "folders (curl --data-binary @tasks.tar -H 'Content-Type: application/x-tar', or prefix-serve upload)",
            field="content-type", got=shown,
        )  # fmt: skip
    with tempfile.TemporaryFile(prefix="prefix-serve-bulk-") as spool:  # the body on disk, never whole in memory
        pending: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            pending.append(chunk)
            size += len(chunk)
            if size >= _SPOOL_WRITE_BYTES:
                await asyncio.to_thread(spool.write, b"".join(pending))
                pending, size = [], 0
        if pending:
            await asyncio.to_thread(spool.write, b"".join(pending))
        results = await asyncio.to_thread(_import_archive, state, spool, replace)
    counts = Counter(result.status for result in results)
    for result in results:
        state.metrics.uploads.labels(result.status if result.status != "error" else (result.type or "error")).inc()
    return BulkImportResponse(
        created=counts["created"], replaced=counts["replaced"], errors=counts["error"], results=results
    )


def _archive_limits(state: ServiceState) -> ArchiveLimits:
    settings = state.settings
    text_bytes = UploadFormLimits.of(state).field_bytes("text")
    return ArchiveLimits(
        max_tasks=settings.max_bulk_tasks,
        max_config_bytes=settings.max_config_bytes,
        max_prefix_bytes=settings.max_prefix_bytes,
        max_task_json_bytes=task_json_cap(text_bytes, settings.max_template_chars, settings.max_description_chars),
    )


def _import_archive(state: ServiceState, spool: BinaryIO, replace: bool) -> list[BulkTaskResult]:
    """Check every header, then store the tasks side by side (each worker thread exits when the import ends, so
    no OpenMP team outlives it: service.compute_thread)."""
    with open_archive(spool) as archive:
        tasks = scan_archive(archive, _archive_limits(state))
        lock = threading.Lock()

        def one(task: TaskMembers) -> BulkTaskResult:
            shown = task.task_id if len(task.task_id) <= 100 else task.task_id[:100] + "..."
            try:
                if task.problem is not None:
                    raise task.problem
                validate_task_id(task.task_id)
                files = read_task(archive, lock, task)
                adapter = files.adapter
                record, created, _ = store_task(
                    state, task.task_id, (lambda: adapter) if adapter is not None else None, files.text,
                    files.prompt_template, files.description, replace,
                )  # fmt: skip
            except ServiceError as exc:
                return BulkTaskResult(
                    task_id=shown, status="error", error=exc.message, type=exc.code, status_code=exc.status_code
                )
            except Exception:  # noqa: BLE001 - one task's fault must not lose the others' results
                logger.exception("bulk import: storing task %r failed", shown)
                return BulkTaskResult(
                    task_id=shown, status="error", error="internal error while storing this task (see the server log)",
                    type="internal_error", status_code=500,
                )  # fmt: skip
            return BulkTaskResult(
                task_id=record.task_id, status="created" if created else "replaced", sha256=record.sha256,
                num_virtual_tokens=record.num_virtual_tokens,
            )  # fmt: skip

        with ThreadPoolExecutor(max_workers=state.settings.bulk_workers, thread_name_prefix="prefix-serve-bulk") as pool:
            return list(pool.map(one, tasks))


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-tar": {}}, "description": "A tar of the stored task folders"},
        403: {"model": ErrorResponse, "description": "The key lacks the admin scope"},
    },
    dependencies=ADMIN,
)
def export_prefixes(
    state: State, prefix: Annotated[str, Query(description="Only task ids that begin with this.")] = ""
) -> StreamingResponse:
    """Every stored task (or those whose id begins with `prefix`) as an uncompressed tar of the folders
    POST /prefixes/bulk takes back, streamed a task at a time. A task deleted while the export runs is left out.
    This route shadows GET /prefixes/{task_id} for a task named `export` (its record is still in the listing)."""
    check_prefix(prefix)

    def tasks() -> Iterator[tuple[str, dict[str, bytes]]]:
        after: str | None = None
        while True:
            records, has_more = state.registry.page(after=after, limit=EXPORT_PAGE, prefix=prefix)
            for record in records:
                try:
                    yield record.task_id, state.registry.adapter_files(record.task_id)
                except TaskNotFoundError:
                    continue
            if not has_more or not records:
                return
            after = records[-1].task_id

    filename = f"prefixes-{prefix}.tar" if prefix else "prefixes.tar"
    return StreamingResponse(
        tar_stream(tasks()), media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )  # fmt: skip


EXPORT_PAGE = 1000


@router.get("/{task_id}", response_model=PrefixState, responses={404: {"model": ErrorResponse}}, dependencies=READ)
def get_prefix(task_id: str, state: State) -> PrefixState:
    return _state(state, state.registry.record(task_id))


@router.get(
    "/{task_id}/adapter",
    response_class=Response,
    responses={
        200: {"content": {"application/zip": {}}, "description": "A zip of the PEFT adapter directory"},
        403: {"model": ErrorResponse, "description": "The key lacks the admin scope"},
        404: {"model": ErrorResponse},
    },
    dependencies=ADMIN,
)
def download_adapter(task_id: str, state: State) -> Response:
    """The task's PEFT files as a zip (adapter_config.json, adapter_model.safetensors, and task.json when the task
    has one): `PeftModel.from_pretrained(model, dir)` loads the unzipped folder, and `prefix-serve train
    --init-task` can start from it."""
    files = state.registry.adapter_files(task_id)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(f"{task_id}/{name}", data)
    return Response(
        content=buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{task_id}.zip"'},
    )


@router.delete(
    "/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses={404: {"model": ErrorResponse}}, dependencies=ADMIN
)
def delete_prefix(task_id: str, state: State) -> Response:
    state.registry.delete(task_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
