"""Run one-off model work (loading, start-up checks, a text task's forward) in a thread that then exits.

Why: torch's CPU kernels run in OpenMP teams, one team per thread that ever started a parallel region, kept alive as
long as that thread lives. GNU OpenMP counts the threads of all live teams, and once they outnumber the cores it stops
spinning between parallel regions and sleeps instead, so every small kernel pays a wake-up. Measured here (2 cores,
SmolLM2, a 32-row decode step on the engine thread): 103 ms when the engine thread is the only thread that computed,
135 ms when the thread that loaded the model is still alive and idle. The engine thread is the one long-lived
computing thread; everything else that computes should leave no team behind.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_in_fresh_thread(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`fn(*args, **kwargs)` in a new thread, joined; its result is returned, its exception re-raised here."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"prefix-serve-{getattr(fn, '__name__', 'compute')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
