"""Pages of the task listings (GET /prefixes, GET /v1/models): the limit's bounds and the opaque cursor.

Order is by task id. A cursor names the last task id a page returned (and the filter it was taken under), so the next
page starts after that id: a task added or removed between two pages neither repeats nor skips any other task."""

from __future__ import annotations

import base64
import binascii
import json

from service.errors import InvalidRequestError
from service.registry import TASK_ID_PATTERN, is_valid_task_id
from service.settings import Settings

_CURSOR_VERSION = 1


def page_limit(limit: int | None, settings: Settings, *, field: str = "limit") -> int:
    """The page size: `list_default_limit` when none is given, else 1..`list_max_limit` (422 beyond)."""
    if limit is None:
        return settings.list_default_limit
    if not 1 <= limit <= settings.list_max_limit:
        raise InvalidRequestError(
            f"{field}: must be between 1 and {settings.list_max_limit} (list_max_limit), got {limit}; follow "
            "next_cursor for the rest",
            field=field, limit=settings.list_max_limit,
        )  # fmt: skip
    return limit


MAX_PREFIX_CHARS = 64  # a task id's longest


def check_prefix(prefix: str, *, field: str = "prefix") -> str:
    if len(prefix) > MAX_PREFIX_CHARS:
        raise InvalidRequestError(
            f"{field}: at most {MAX_PREFIX_CHARS} characters (a task id's longest), got {len(prefix)}", field=field
        )
    # Any start of a valid task id is itself one; anything else matches no task (and must not reach a header).
    if prefix and not is_valid_task_id(prefix):
        raise InvalidRequestError(
            f"{field}: {prefix[:80]!r} cannot begin a task id (task ids match {TASK_ID_PATTERN})", field=field
        )
    return prefix


def encode_cursor(last_task_id: str, prefix: str) -> str:
    raw = json.dumps({"v": _CURSOR_VERSION, "after": last_task_id, "prefix": prefix}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str, prefix: str) -> str:
    """The task id a cursor starts after. 422 for a cursor this server did not make, or one taken under another
    `prefix` filter (its position would mean something else)."""
    shown = cursor if len(cursor) <= 100 else cursor[:100] + "..."
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"))
        valid = (
            isinstance(data, dict) and data.get("v") == _CURSOR_VERSION
            and isinstance(data.get("after"), str) and isinstance(data.get("prefix"), str)
        )  # fmt: skip
    except (ValueError, UnicodeError, binascii.Error):
        valid = False
    if not valid:
        raise InvalidRequestError(
            f"cursor: {shown!r} is not a cursor this server returned; pass a next_cursor value unchanged, or omit "
            "cursor for the first page",
            field="cursor",
        )
    if data["prefix"] != prefix:
        raise InvalidRequestError(
            f"cursor: it was returned for prefix={data['prefix']!r}, not prefix={prefix!r}; keep the same prefix "
            "while following next_cursor",
            field="cursor",
        )
    return data["after"]
