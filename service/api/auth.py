"""API keys in two scopes: `generate` (generation and reading the prefix list) and `admin` (upload, replace,
delete; implies generate). Keys come from settings (env) or a file; they arrive as `Authorization: Bearer <key>`
and are compared in constant time. With no keys configured, auth is off, which the CLI allows only on a loopback
address unless --allow-unauthenticated is given."""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path
from typing import Callable, Literal

from fastapi import Depends, Request

from service.api.state import ServiceState, get_state
from service.errors import ForbiddenError, UnauthorizedError
from service.settings import Settings

Scope = Literal["generate", "admin"]


class ApiKeys:
    def __init__(self, generate_keys: list[str], admin_keys: list[str]) -> None:
        self._keys: list[tuple[bytes, frozenset[str]]] = [
            (k.encode("utf-8"), frozenset({"generate"})) for k in generate_keys if k
        ] + [(k.encode("utf-8"), frozenset({"generate", "admin"})) for k in admin_keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        generate_keys, admin_keys = list(settings.api_keys), list(settings.admin_api_keys)
        if settings.api_keys_file is not None:
            more_generate, more_admin = _read_key_file(settings.api_keys_file)
            generate_keys += more_generate
            admin_keys += more_admin
        return cls(generate_keys, admin_keys)

    def scopes_for(self, presented: str) -> frozenset[str]:
        """Every stored key is compared (no early exit), each with compare_digest, so timing reveals nothing."""
        candidate = presented.encode("utf-8")
        scopes: frozenset[str] = frozenset()
        for key, key_scopes in self._keys:
            if hmac.compare_digest(candidate, key):
                scopes = scopes | key_scopes
        return scopes


def _read_key_file(path: Path) -> tuple[list[str], list[str]]:
    """Lines `admin:KEY` or `generate:KEY` (a bare `KEY` is a generate key); blank lines and `#` comments skipped."""
    generate_keys: list[str] = []
    admin_keys: list[str] = []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        scope, sep, key = line.partition(":")
        if not sep:
            scope, key = "generate", line
        if scope not in ("generate", "admin") or not key.strip():
            raise ValueError(f"{path}:{number}: expected 'generate:KEY' or 'admin:KEY'")
        (admin_keys if scope == "admin" else generate_keys).append(key.strip())
    return generate_keys, admin_keys


def require(scope: Scope) -> Callable[..., None]:
    """A FastAPI dependency that lets the request through only with a key of `scope`."""

    def check(request: Request, state: ServiceState = Depends(get_state)) -> None:
        keys = state.api_keys
        if not keys.enabled:
            return
        header = request.headers.get("authorization", "")
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
        scopes = keys.scopes_for(token.strip())
        if not scopes:
            raise UnauthorizedError("invalid API key")
        if scope not in scopes:
            raise ForbiddenError(f"this API key lacks the '{scope}' scope", required_scope=scope)

    return check


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(settings: Settings) -> str | None:
    """Why the server must not start as configured, or None. Binding beyond loopback needs keys (or a flag)."""
    if is_loopback(settings.host) or settings.allow_unauthenticated or ApiKeys.from_settings(settings).enabled:
        return None
    return (
        f"refusing to bind {settings.host}: no API keys are configured, so anyone who can reach this address could "
        "upload, delete and generate. Set PREFIX_SERVE_API_KEYS / PREFIX_SERVE_ADMIN_API_KEYS (or "
        "PREFIX_SERVE_API_KEYS_FILE), bind 127.0.0.1, or pass --allow-unauthenticated."
    )
