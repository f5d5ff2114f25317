"""The bulk-import archive (POST /prefixes/bulk) and the export archive (GET /prefixes/export): an uncompressed tar of
task folders, `<task_id>/adapter_config.json`, `<task_id>/adapter_model.safetensors` and optionally
`<task_id>/task.json` (the layout `GET /prefixes/{task_id}/adapter` zips and `PeftModel.from_pretrained` loads).

Reading checks every header before any task is stored: a member that could escape its folder (an absolute name, a
`..`, a link or device, a name deeper than `<task_id>/<file>`) refuses the whole archive (422), and so do more task
folders than `max_bulk_tasks`. What is wrong with one task only (an unknown file, a member over its size cap, a file
sent twice, a missing file) is that task's error, reported beside the others' results. Validating and storing a
task is not done here: the route hands each task's bytes to the one upload path (`store_task` -> `registry.put`)."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

from service.errors import InvalidPrefixError, InvalidRequestError, PayloadTooLargeError, ServiceError

# The registry's folder layout (service.registry's CONFIG_FILE, WEIGHTS_FILE, TASK_FILE; tests/test_bulk.py checks they
# agree), spelled here so that the upload client (service.upload) can write archives without importing torch.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK_FILE = "task.json"

TASK_FILES = (CONFIG_FILE, WEIGHTS_FILE, TASK_FILE)
_MAX_NAME_CHARS = 256
_JSON_ESCAPE_BYTES_PER_CHAR = 6  # json.dumps' default ensure_ascii writes a non-ASCII character as \uXXXX


@dataclass(frozen=True)
class ArchiveLimits:
    max_tasks: int
    max_config_bytes: int
    max_prefix_bytes: int
    max_task_json_bytes: int

    @property
    def max_members(self) -> int:  # each task: its folder entry and its three files
        return self.max_tasks * (len(TASK_FILES) + 1)

    def cap(self, name: str) -> int:
        return {CONFIG_FILE: self.max_config_bytes, WEIGHTS_FILE: self.max_prefix_bytes}.get(
            name, self.max_task_json_bytes
        )


def task_json_cap(text_bytes: int, max_template_chars: int, max_description_chars: int) -> int:
    """A task.json this server could have written: the text (ASCII-escaped, at most 3 bytes per UTF-8 byte), the
    template and description (6 bytes per character escaped), and room for the keys."""
    return 3 * text_bytes + _JSON_ESCAPE_BYTES_PER_CHAR * (max_template_chars + max_description_chars) + 64 * 1024


@dataclass
class TaskMembers:
    """One task folder of the archive: its members by file name, or the problem that keeps it from being stored."""

    task_id: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    problem: ServiceError | None = None


def _archive_error(name: str, why: str) -> InvalidRequestError:
    shown = name if len(name) <= 100 else name[:100] + "..."
    return InvalidRequestError(
        f"archive member {shown!r}: {why}; a bulk import is a tar of <task_id>/adapter_config.json, "
        "<task_id>/adapter_model.safetensors and optionally <task_id>/task.json",
        field="archive", member=shown,
    )  # fmt: skip


def _parts(name: str) -> list[str]:
    """The member's path parts, `./` stripped; an archive error for a name that could land outside its folder."""
    if len(name) > _MAX_NAME_CHARS or any(ord(c) < 32 or c == "\\" for c in name):
        raise _archive_error(name, "a name with control characters, backslashes or over 256 characters")
    if name.startswith("/"):
        raise _archive_error(name, "an absolute path")
    parts = name.split("/")
    while parts and parts[0] == ".":
        parts.pop(0)
    if parts and parts[-1] == "":  # a directory written as "task/"
        parts.pop()
    if any(part in ("", ".", "..") for part in parts):
        raise _archive_error(name, "an empty, '.' or '..' path part")
    return parts


def scan_archive(archive: tarfile.TarFile, limits: ArchiveLimits) -> list[TaskMembers]:
    """Every task folder of the archive, in task-id order, from the headers alone (no member's data is read)."""
    try:
        return _scan(archive, limits)
    except tarfile.TarError as exc:  # a truncated or corrupt header
        raise InvalidRequestError(f"archive: not a readable tar ({exc})", field="archive") from None


def _scan(archive: tarfile.TarFile, limits: ArchiveLimits) -> list[TaskMembers]:
    tasks: dict[str, TaskMembers] = {}
    count = 0
    for member in archive:
        count += 1
        if count > limits.max_members:
            raise PayloadTooLargeError(
                f"archive: more than {limits.max_members} members; a bulk import holds at most {limits.max_tasks} "
                "task folders (max_bulk_tasks): split it",
                field="archive", limit=limits.max_tasks,
            )  # fmt: skip
        parts = _parts(member.name)
        if not parts:  # the archive's root folder itself
            if not member.isdir():
                raise _archive_error(member.name, "not a task folder")
            continue
        if not (member.isdir() or member.isreg()) or member.issparse():
            raise _archive_error(member.name, "not a regular file or folder (links and devices are refused)")
        if len(parts) > 2 or (len(parts) == 1 and not member.isdir()) or (len(parts) == 2 and member.isdir()):
            raise _archive_error(member.name, "expected <task_id>/ or <task_id>/<file>")
        task_id = parts[0]
        task = tasks.get(task_id)
        if task is None:
            if len(tasks) >= limits.max_tasks:
                raise PayloadTooLargeError(
                    f"archive: more than {limits.max_tasks} task folders (max_bulk_tasks): split it",
                    field="archive", limit=limits.max_tasks,
                )  # fmt: skip
            task = tasks[task_id] = TaskMembers(task_id)
        if len(parts) == 1 or task.problem is not None:
            continue
        name = parts[1]
        if name not in TASK_FILES:
            task.problem = InvalidRequestError(
                f"{task_id}/{name[:100]}: unexpected file; a task folder holds {CONFIG_FILE}, {WEIGHTS_FILE} and "
                f"optionally {TASK_FILE}",
                field=name[:100],
            )
        elif name in task.members:
            task.problem = InvalidRequestError(f"{task_id}/{name}: in the archive more than once", field=name)
        elif member.size > limits.cap(name):
            task.problem = PayloadTooLargeError(
                f"{task_id}/{name}: {member.size} bytes, over its {limits.cap(name)}-byte limit",
                field=name, limit=limits.cap(name),
            )  # fmt: skip
        else:
            task.members[name] = member
    for task in tasks.values():
        if task.problem is None and TASK_FILE not in task.members:
            missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in task.members]
            if missing:
                task.problem = InvalidPrefixError(
                    missing[0], "a file", "nothing", message=f"{task.task_id}/{missing[0]}: missing from the archive"
                )
    return [tasks[task_id] for task_id in sorted(tasks)]


@dataclass(frozen=True)
class TaskFiles:
    """What one task folder of the archive asks for, read and parsed (task.json's fields, not yet validated)."""

    adapter: tuple[bytes, bytes] | None  # (config, weights); None when task.json makes the task from its text
    text: str | None
    prompt_template: str | None
    description: str | None


def read_task(archive: tarfile.TarFile, lock: threading.Lock, task: TaskMembers) -> TaskFiles:
    """The task's files (read under `lock`: a TarFile has one file position) and task.json's fields. A task.json of
    a task made from text (`source: "text"`) makes the task from its text again, as `prefix-serve upload` does."""
    with lock:
        data = {name: _read_member(archive, member) for name, member in task.members.items()}
    stored: dict[str, Any] = {}
    if TASK_FILE in data:
        try:
            loaded = json.loads(data[TASK_FILE].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequestError(f"{task.task_id}/{TASK_FILE}: not valid JSON ({exc})", field=TASK_FILE) from None
        if not isinstance(loaded, dict):
            raise InvalidRequestError(f"{task.task_id}/{TASK_FILE}: not a JSON object", field=TASK_FILE)
        stored = loaded
    fields: dict[str, str | None] = {}
    for name in ("prompt_template", "description", "text"):
        value = stored.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"{task.task_id}/{TASK_FILE}: {name} must be a string", field=name)
        fields[name] = value
    text = fields["text"] if stored.get("source") == "text" and fields["text"] else None
    adapter = None
    if text is None:
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if name not in data]
        if missing:
            raise InvalidPrefixError(
                missing[0], "a file", "nothing", message=f"{task.task_id}/{missing[0]}: missing from the archive"
            )
        adapter = (data[CONFIG_FILE], data[WEIGHTS_FILE])
    return TaskFiles(adapter, text, fields["prompt_template"], fields["description"])


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    extracted = archive.extractfile(member)
    assert extracted is not None  # a regular file (scan_archive)
    return extracted.read()


class _Sink(io.RawIOBase):
    """A write-only file whose bytes are taken out after each task: the export streams, never holding the tar."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self.chunks = b"".join(self.chunks), []
        return out


def tar_stream(tasks: Iterator[tuple[str, dict[str, bytes]]]) -> Iterator[bytes]:
    """An uncompressed tar of `<task_id>/<file>` members, yielded a task at a time."""
    sink = _Sink()
    now = int(time.time())
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as archive:  # type: ignore[call-overload]
        for task_id, files in tasks:
            folder = tarfile.TarInfo(task_id)
            folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, now
            archive.addfile(folder)
            for name, data in files.items():
                info = tarfile.TarInfo(f"{task_id}/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, now
                archive.addfile(info, io.BytesIO(data))
            yield sink.take()
    yield sink.take()  # the end-of-archive blocks


def open_archive(spool: IO[bytes]) -> tarfile.TarFile:
    """The spooled body as a tar (uncompressed: a compressed one would be decompressed again for each task read)."""
    spool.seek(0)
    head = spool.read(4)
    spool.seek(0)
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:4] == b"\xfd7zX":
        raise InvalidRequestError(
            "archive: compressed; send an uncompressed tar (adapter weights are random-looking floats, compression "
            "saves little): tar -cf tasks.tar TASK_DIR...",
            field="archive",
        )
    try:
        return tarfile.open(fileobj=spool, mode="r:")
    except tarfile.TarError as exc:
        raise InvalidRequestError(f"archive: not a tar file ({exc})", field="archive") from None
