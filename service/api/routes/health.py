"""GET /health: 200 once the model is loaded (the app only starts answering after that)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.schemas import HealthResponse
from service.api.state import ServiceState, get_state

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
def health(state: Annotated[ServiceState, Depends(get_state)]) -> HealthResponse:
    loaded = state.model
    return HealthResponse(
        status="ok",
        model=loaded.name,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        prefixes=len(state.registry),
    )
