"""What the micro-benchmark experiments share: arms timed in turns, and their JSON result printed and written."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable


def time_in_turns(arms: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each arm, one value a round: every round runs each arm once to warm it, then `calls`
    timed calls, the arms in turns, so a busy moment of the machine hits every arm alike."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(rounds):
        for name, call in arms.items():
            call()
            started = time.perf_counter()
            for _ in range(calls):
                call()
            times[name].append((time.perf_counter() - started) / calls)
    return times


def write_result(result: dict[str, Any], out: Path | None) -> None:
    """Print the result as JSON and, with `out`, write it there too."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
