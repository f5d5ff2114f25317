"""The JSON shape of an error, by API: TGI-style routes answer `{"error": message, "type": code, ...details}`; the
OpenAI-compatible routes (`/v1/*`) answer `{"error": {"message", "type", "param", "code"}}` as OpenAI and vLLM do, so
the official clients show the message (with the project's shape, `str(exc)` showed only "Error code: 404")."""

from __future__ import annotations

from typing import Any

from service.errors import ServiceError

# OpenAI's error `type` for each status (its documented families); `code` carries the project's specific code.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_body(path: str, status: int, message: str, code: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    details = details or {}
    if is_openai_path(path):
        param = details.get("field")
        return {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                "param": param if isinstance(param, str) else None,
                "code": code,
            }
        }
    return {"error": message, "type": code, **details}


def service_error_body(path: str, exc: ServiceError) -> dict[str, Any]:
    return error_body(path, exc.status_code, exc.message, exc.code, exc.details)
