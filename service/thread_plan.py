"""A per-thread "active plan": the layout of one forward pass, set around that forward and read by the attention
functions and hooks transformers calls inside it (which receive no argument of ours).

Per thread, so that a forward on another thread (a reference run, a probe, the start-up check) sees no plan and runs
plain sdpa. Leaving the block restores the plan that was active before it (None outside any block), so nested use is
safe."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

PlanT = TypeVar("PlanT")


class ThreadPlan(Generic[PlanT]):
    def __init__(self) -> None:
        self._local = threading.local()

    @contextmanager
    def active(self, plan: PlanT) -> Iterator[PlanT]:
        """Make `plan` the current plan of this thread for the duration of the block."""
        previous = self.current()
        self._local.plan = plan
        try:
            yield plan
        finally:
            self._local.plan = previous

    def current(self) -> PlanT | None:
        return getattr(self._local, "plan", None)
