"""API keys (`service.api.keys`): two scopes, from settings and a key file, compared in constant time; a key that
could never match is refused. (Enforcement on requests: test_hardening.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.api.keys import ApiKeys
from service.settings import Settings


def test_key_file_and_env_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nadmin:root-key\ngenerate:reader\nbare-reader\n\n")
    monkeypatch.setenv("PREFIX_SERVE_API_KEYS", "one, two")
    keys = ApiKeys.from_settings(Settings(api_keys_file=key_file))
    assert keys.scopes_for("root-key") == {"admin", "generate"}
    assert keys.scopes_for("reader") == keys.scopes_for("bare-reader") == keys.scopes_for("two") == {"generate"}
    assert keys.scopes_for("nope") == frozenset() and keys.scopes_for("") == frozenset()
    key_file.write_text("owner:x\n")
    with pytest.raises(ValueError, match="keys:1"):
        ApiKeys.from_settings(Settings(api_keys_file=key_file))


def test_blank_key_in_a_key_file_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("admin:   \n")
    with pytest.raises(ValueError, match="keys:1"):
        ApiKeys.from_settings(Settings(api_keys_file=key_file))


def test_an_admin_key_carries_both_scopes_and_no_keys_means_auth_is_off() -> None:
    keys = ApiKeys(["reader"], ["root"])
    assert keys.enabled and keys.scopes_for("root") == {"admin", "generate"} and keys.scopes_for("reader") == {"generate"}
    assert keys.scopes_for("reader ") == frozenset(), "keys match exactly"
    assert not ApiKeys([], []).enabled
