"""API keys in two scopes: `generate` (generation and reading the prefix list) and `admin` (upload, replace,
delete, and downloading a task's files, which carry a text task's text and trained weights; implies generate). Keys come from settings (env) or a file; they arrive as `Authorization: Bearer <key>`
and are compared in constant time. With no keys configured, auth is off, which the CLI allows only on a loopback
address unless --allow-unauthenticated is given.

Each route declares its scope with a `require(...)` dependency. `AuthMiddleware` enforces that declaration from the
request headers alone, before the app reads or parses the body: a 60 MB body or `{not json` without a key is a 401,
never read. (FastAPI itself parses the body before it runs any dependency.) The dependency checks again, so a route
stays protected if it is ever served without the middleware."""

from __future__ import annotations

import ipaddress
import json
from typing import Any, Callable, Literal

from fastapi import Depends, Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope as AsgiScope, Send

from service.api.error_bodies import service_error_body
from service.api.keys import ApiKeys
from service.api.state import ServiceState, get_state
from service.errors import ForbiddenError, ServiceError, UnauthorizedError
from service.settings import Settings

Scope = Literal["generate", "admin"]
SettingsPredicate = Callable[[Settings], bool]


def authorize(keys: ApiKeys, authorization: str, scope: Scope) -> None:
    """Raise 401/403 unless the `Authorization` header value carries a key with `scope`. No-op with auth off."""
    if not keys.enabled:
        return
    kind, _, token = authorization.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise UnauthorizedError("missing API key: send 'Authorization: Bearer <key>'")
    scopes = keys.scopes_for(token.strip())
    if not scopes:
        raise UnauthorizedError("invalid API key")
    if scope not in scopes:
        raise ForbiddenError(f"this API key lacks the '{scope}' scope", required_scope=scope)


def require(scope: Scope, *, only_if: SettingsPredicate | None = None) -> Callable[..., None]:
    """A FastAPI dependency that lets the request through only with a key of `scope` (when `only_if(settings)`, if
    given, is true). AuthMiddleware reads the same declaration to check before the body is read."""

    def check(request: Request, state: ServiceState = Depends(get_state)) -> None:
        if only_if is None or only_if(state.settings):
            authorize(state.api_keys, request.headers.get("authorization", ""), scope)

    check.required_scope = scope  # type: ignore[attr-defined]
    check.only_if = only_if  # type: ignore[attr-defined]
    return check


Requirement = tuple[Scope, "SettingsPredicate | None"]


def route_requirement(route: Any) -> Requirement | None:
    """The strongest `require(...)` a route declares (an APIRouter's own dependencies are copied onto its routes)."""
    found: list[Requirement] = []
    for dependency in getattr(route, "dependencies", None) or []:
        scope = getattr(dependency.dependency, "required_scope", None)
        if scope is not None:
            found.append((scope, getattr(dependency.dependency, "only_if", None)))
    return _strongest(found)


def _strongest(found: list[Requirement]) -> Requirement | None:
    return max(found, key=lambda item: (item[0] == "admin", item[1] is None)) if found else None


class AuthMiddleware:
    """Checks the API key a request's route requires, from its headers, before the app touches the body.

    `routers` are the APIRouters the app includes (without a prefix): their routes are matched here the way the app
    will match them. Routes with no `require(...)` (health, docs) and paths no route matches (a 404) pass through."""

    def __init__(self, app: ASGIApp, *, routers: list[Any]) -> None:
        self.app = app
        self.rules: list[tuple[Any, Requirement]] = []
        for router in routers:
            for route in router.routes:
                requirement = route_requirement(route)
                if requirement is not None:
                    self.rules.append((route, requirement))

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: ServiceState | None = getattr(getattr(scope.get("app"), "state", None), "service", None)
        requirement = self._requirement(scope) if state is not None else None
        if requirement is not None and state is not None:
            required, only_if = requirement
            if only_if is None or only_if(state.settings):
                authorization = ""
                for name, value in scope.get("headers", []):
                    if name.lower() == b"authorization":
                        authorization = value.decode("latin-1")
                        break
                try:
                    authorize(state.api_keys, authorization, required)
                except ServiceError as exc:
                    await _send_json(send, scope.get("path", ""), exc)
                    return
        await self.app(scope, receive, send)

    def _requirement(self, scope: AsgiScope) -> Requirement | None:
        """The first route that fully matches; if only the path matches (a 405 is coming), the strictest requirement
        among those routes, so a wrong method learns nothing either."""
        partial: list[Requirement] = []
        for route, requirement in self.rules:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return requirement
            if match is Match.PARTIAL:
                partial.append(requirement)
        return _strongest(partial)


async def _send_json(send: Send, path: str, exc: ServiceError) -> None:
    body = json.dumps(service_error_body(path, exc)).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(exc, UnauthorizedError):
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
