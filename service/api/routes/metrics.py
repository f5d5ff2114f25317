"""GET /metrics: Prometheus text format. Its labels name tasks, so with API keys configured it needs a generate key
(unless PREFIX_SERVE_METRICS_REQUIRE_KEY=false, for a scraper that cannot send one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from service.api.auth import require
from service.api.state import ServiceState, get_state
from service.metrics import PROMETHEUS_CONTENT_TYPE

router = APIRouter(
    tags=["metrics"], dependencies=[Depends(require("generate", only_if=lambda s: s.metrics_require_key))]
)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    registry = state.registry
    for tier, count in registry.count_by_tier().items():
        state.metrics.prefixes.labels(tier).set(count)
    # Each prefix byte once, where it is: the device tier (the engine's prefix bank in the slot layout) and host memory.
    for tier, nbytes in registry.bytes_by_tier().items():
        state.metrics.prefix_bytes.labels(tier).set(nbytes)
    return Response(state.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)
