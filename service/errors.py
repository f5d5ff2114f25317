"""Errors the service raises on purpose. Each carries the HTTP status and a message that names the problem."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: an error a client should see as JSON `{"error": message, "type": code, ...details}`."""

    status_code: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "type": self.code, **self.details}


class UnsupportedModelError(ServiceError):
    """The base model cannot carry PEFT prefixes faithfully (raised at start-up, not per request)."""

    status_code = 500
    code = "unsupported_model"


class InvalidPrefixError(ServiceError):
    """An uploaded adapter does not fit the served model. Names the field, what was expected, what came."""

    status_code = 422
    code = "invalid_prefix"

    def __init__(self, field: str, expected: Any, got: Any, message: str | None = None) -> None:
        text = message or f"{field}: expected {expected}, got {got}"
        super().__init__(text, field=field, expected=_jsonable(expected), got=_jsonable(got))


class PayloadTooLargeError(ServiceError):
    status_code = 413
    code = "payload_too_large"


class InvalidTaskIdError(ServiceError):
    status_code = 422
    code = "invalid_task_id"


class TaskNotFoundError(ServiceError):
    status_code = 404
    code = "task_not_found"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task '{task_id}' has no prefix; upload one with POST /prefixes", task_id=task_id)


class TaskExistsError(ServiceError):
    status_code = 409
    code = "task_exists"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task '{task_id}' already has a prefix; send replace=true to overwrite it", task_id=task_id)


class RequestTooLongError(ServiceError):
    """Prompt + prefix + new tokens would not fit the model's context."""

    status_code = 422
    code = "context_length_exceeded"


class UnauthorizedError(ServiceError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(ServiceError):
    status_code = 403
    code = "forbidden"


class PrefixLimitError(ServiceError):
    """The store holds as many prefixes as it may."""

    status_code = 409
    code = "prefix_limit_reached"


class InvalidRequestError(ServiceError):
    status_code = 422
    code = "invalid_request"


class OverloadedError(ServiceError):
    """The bounded queue is full: come back later (429 with Retry-After)."""

    status_code = 429
    code = "overloaded"


class ModelNotFoundError(ServiceError):
    """OpenAI routes: `model` names neither a stored task nor the base model."""

    status_code = 404
    code = "model_not_found"

    def __init__(self, model: str, base: str) -> None:
        shown = model if len(model) <= 100 else model[:100] + "..."
        super().__init__(
            f"model '{shown}' does not exist: use a task id from GET /v1/models (upload one with POST /prefixes) "
            f"or the base model '{base}'",
            model=shown,
            field="model",
        )


class UnsupportedMediaTypeError(ServiceError):
    """A JSON route got a body of another content type."""

    status_code = 415
    code = "unsupported_media_type"


class DeadlineExceededError(ServiceError):
    """The request ran past the server's per-request deadline."""

    status_code = 504
    code = "deadline_exceeded"


class NotAvailableHereError(ServiceError):
    """A feature this process cannot serve (e.g. a task made from text on the Ray ingress, which holds no weights)."""

    status_code = 501
    code = "not_implemented"


class NonFiniteLogitsError(ServiceError):
    """The model's logits for one request became NaN or inf, or collapsed to one value (an inf inside the forward,
    e.g. a norm's variance, zeroed the state): a prefix whose values overflow the computation. The request fails with
    this instead of returning tokens picked from them. Other rows of the batch are unaffected."""

    status_code = 422
    code = "non_finite_logits"

    def __init__(self, task_id: str | None, token_index: int) -> None:
        what = f"task '{task_id}'" if task_id else "the base model"
        super().__init__(
            f"the model's logits became NaN/inf (or all equal) at generated token {token_index} ({what}): the "
            "task's prefix values overflow the model's computation, so no token could be chosen; re-upload the task "
            "with smaller values (uploads refuse such prefixes)",
            task_id=task_id, token_index=token_index,
        )  # fmt: skip


class PrefixVersionError(ServiceError):
    """A specific version (sha256) of a task's prefix was asked for, but the store holds another (or none)."""

    status_code = 409
    code = "prefix_version_changed"

    def __init__(self, task_id: str, wanted: str, stored: str | None) -> None:
        super().__init__(
            f"task '{task_id}' changed while the request was in flight (wanted sha256 {wanted[:12]}, "
            f"stored {stored[:12] if stored else 'none'})",
            task_id=task_id, wanted_sha256=wanted, stored_sha256=stored,
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


class StoredTaskUnreadableError(ServiceError):
    """A stored task's files no longer match its record (changed or damaged on disk since they were indexed). The
    task is dropped from the store's view (its folder stays for inspection): later requests get a 404 and a new
    upload takes its place."""

    status_code = 503
    code = "stored_task_unreadable"

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(
            f"task '{task_id}' cannot be served: its stored files do not match its record ({reason}); it has been "
            "taken out of the store, upload it again",
            task_id=task_id,
        )
