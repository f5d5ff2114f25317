"""What the routers share: the loaded model, the prefix registry and the engine."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.engine import Engine
from service.model_loader import LoadedModel
from service.registry import PrefixRegistry
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    model: LoadedModel
    registry: PrefixRegistry
    engine: Engine


def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: the state the lifespan built."""
    return request.app.state.service
