"""What the routers share: the loaded model, the prefix registry and the engine."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.api.keys import ApiKeys
from service.engine import Engine
from service.inputs import InputProcessor
from service.metrics import Metrics
from service.model_loader import LoadedModel
from service.registry import PrefixRegistry
from service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    model: LoadedModel
    registry: PrefixRegistry
    engine: Engine
    metrics: Metrics
    api_keys: ApiKeys
    inputs: InputProcessor  # builds every route's engine requests (service.inputs)


def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: the state the lifespan built."""
    return request.app.state.service
