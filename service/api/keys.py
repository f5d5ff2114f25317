"""The API keys a server accepts, in two scopes (`generate`, `admin`), from settings or a key file.

Apart from `service.api.auth` (which enforces them on requests) so that `ServiceState` can hold the keys without the
state and the auth modules importing each other."""

from __future__ import annotations

import hmac
from pathlib import Path

from service.settings import Settings


class ApiKeys:
    def __init__(self, generate_keys: list[str], admin_keys: list[str]) -> None:
        for key in [*generate_keys, *admin_keys]:
            if not key.strip() or key != key.strip():
                # Such a key would switch auth on while no request could ever match it (tokens are stripped).
                raise ValueError("an API key is empty, only whitespace, or has surrounding whitespace")
        self._keys: list[tuple[bytes, frozenset[str]]] = [
            (k.encode("utf-8"), frozenset({"generate"})) for k in generate_keys
        ] + [(k.encode("utf-8"), frozenset({"generate", "admin"})) for k in admin_keys]

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
