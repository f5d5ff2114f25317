"""One config path for the engine's budgets: every default written once (in Settings), every knob settable.

`EngineLimits.from_settings` is the one way the service builds limits; `EngineLimits()` and `SlotLimits()` (tests,
the bench) run the same budgets as the server, and the slot layout's limits are derived from the engine's.
"""

from __future__ import annotations

import dataclasses

import pytest

from service.engine import EngineLimits
from service.settings import Settings
from service.scheduling.padded import PaddedLimits
from service.scheduling.slot_schedule import SlotLimits

# EngineLimits field -> the Settings field it comes from, and how (a test value, the value EngineLimits then holds).
SOURCES = {
    "max_running_rows": ("max_running_rows", 7, 7),
    "max_kv_tokens": ("max_kv_tokens", 1234, 1234),
    "max_waiting": ("max_waiting", 9, 9),
    "max_prefill_rows": ("max_prefill_rows", 3, 3),
    "step_token_budget": ("step_token_budget", 40, 40),
    "idle_token_budget": ("idle_token_budget", 77, 77),
    "per_task_window_s": ("batch_window_ms", 250.0, 0.25),
    "request_timeout_s": ("request_timeout_s", 12.5, 12.5),
}


def test_every_engine_limit_has_a_setting() -> None:
    assert set(SOURCES) == {f.name for f in dataclasses.fields(EngineLimits)}


def test_one_default_per_budget() -> None:
    defaults, configured = EngineLimits(), EngineLimits.from_settings(Settings())
    for field in dataclasses.fields(EngineLimits):
        assert getattr(defaults, field.name) == getattr(configured, field.name), field.name
    assert EngineLimits().max_kv_tokens == Settings().max_kv_tokens == SlotLimits().max_kv_tokens


def test_slot_limits_are_derived_from_engine_limits() -> None:
    assert EngineLimits().slot_limits() == SlotLimits()
    limits = EngineLimits(max_running_rows=5, max_kv_tokens=999, step_token_budget=11, idle_token_budget=44)
    assert limits.slot_limits() == SlotLimits(num_slots=5, max_kv_tokens=999, step_token_budget=11, idle_token_budget=44)
    assert limits.slot_limits().idle_budget == 44
    assert EngineLimits(step_token_budget=16).slot_limits().idle_budget == 8 * 16


def test_padded_limits_are_derived_from_engine_limits() -> None:
    limits = EngineLimits(max_running_rows=5, max_kv_tokens=999, max_prefill_rows=3, per_task_window_s=0.25)
    assert limits.padded_limits() == PaddedLimits(
        max_running_rows=5, max_kv_tokens=999, max_prefill_rows=3, per_task_window_s=0.25
    )


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_engine_limit_is_settable_from_settings(name: str) -> None:
    setting, value, expected = SOURCES[name]
    limits = EngineLimits.from_settings(Settings(**{setting: value}))
    assert getattr(limits, name) == expected


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_engine_limit_is_settable_from_the_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    setting, value, expected = SOURCES[name]
    monkeypatch.setenv(f"PREFIX_SERVE_{setting.upper()}", str(value))
    assert getattr(EngineLimits.from_settings(Settings()), name) == expected


def test_idle_token_budget_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFIX_SERVE_IDLE_TOKEN_BUDGET", "96")
    assert EngineLimits.from_settings(Settings()).slot_limits().idle_budget == 96
    monkeypatch.delenv("PREFIX_SERVE_IDLE_TOKEN_BUDGET")
    assert Settings().idle_token_budget is None
