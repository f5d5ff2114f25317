"""What crosses Ray between the ingress and the model replicas: plain, picklable data.

The project's exceptions do not unpickle across Ray (their constructors take other arguments than `args`), so a
replica never lets one escape: a stream's first item is a `StreamStart` carrying the HTTP status (200 = accepted)
and, on failure, the error's JSON body; a failure after that is a `StreamError` item. The ingress turns either back
into a `RemoteServiceError`, which the app's handlers render exactly as the single-process server would.

A request names its task by id *and* version (sha256 of the stored safetensors) instead of carrying the prefix
tensor; the replica loads that version from the shared store into its own LRU. Only when the store no longer holds
that version (replaced or deleted while the request was on its way) does the ingress resend it with the tensor, so a
request always runs with the version it was accepted with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from service.errors import ServiceError
from service.requests import SamplingParams

BASE_MODEL_ID = ""  # multiplexed id of "no prefix" (the bare base model): not multiplexed


def multiplexed_id(task_id: str, sha256: str) -> str:
    """The Serve multiplexed model id of one version of a task: `task@sha256`. A replace changes it, so every
    replica loads the new version on its next request without any message being sent."""
    return f"{task_id}@{sha256}"


def parse_multiplexed_id(model_id: str) -> tuple[str, str]:
    """`task@sha256` -> (task, sha256); ValueError when it is not one."""
    task_id, sep, sha256 = model_id.rpartition("@")
    if not sep or not task_id or len(sha256) != 64:
        raise ValueError(f"not a task@sha256 id: {model_id!r}")
    return task_id, sha256


@dataclass(frozen=True)
class RemoteRequest:
    prompt_ids: list[int]
    task_id: str | None  # None: the bare base model
    sha256: str | None
    params: SamplingParams
    request_id: str = ""
    with_text: bool = True
    kv: torch.Tensor | None = None  # the prefix itself, only on the fallback path (see module doc)
    encoder_kv: torch.Tensor | None = None  # with `kv`: a full prefix's encoder half

    @property
    def model_id(self) -> str:
        if self.task_id is None or self.sha256 is None:
            return BASE_MODEL_ID
        return multiplexed_id(self.task_id, self.sha256)


@dataclass(frozen=True)
class StreamStart:
    """First item of every replica stream."""

    status: int  # 200: accepted, events follow; otherwise `body` is the error and the stream ends
    replica: str
    body: dict[str, Any] | None = None


@dataclass(frozen=True)
class StreamError:
    """Generation failed after it started (e.g. its deadline passed); the stream ends."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)


# A retry of a request whose replica failed is routed to a live replica at once (Ray replaces a dead one in ~9 s).
REPLICA_RETRY_AFTER_S = 1


def replica_unavailable(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(503, JSON body) of a call to a replica that failed in Ray (it died, or Serve could not reach one). A retry can
    cure it, so it says when: `retry_after_s` becomes the Retry-After header, as for a 429."""
    return 503, {
        "error": f"a model replica failed: {type(exc).__name__}; retry",
        "type": "replica_unavailable",
        "retry_after_s": REPLICA_RETRY_AFTER_S,
    }


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of an exception as the API's error handlers would answer it."""
    if isinstance(exc, ServiceError):
        return exc.status_code, exc.to_json()
    return 500, {"error": "internal server error", "type": "internal_error"}


class RemoteServiceError(ServiceError):
    """A replica's error, rebuilt in the ingress with the replica's status, type and details."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        details = {k: v for k, v in body.items() if k not in ("error", "type")}
        super().__init__(str(body.get("error", "error")), **details)
        self.status_code = status
        self.code = str(body.get("type", "error"))
