"""The interface between the engine's loop and a batch layout's scheduler.

One engine iteration, as vLLM's schedule -> execute -> update: the engine retires rows whose callers went away,
`admit`s waiting requests, runs one `step` (the scheduler decides the step's rows and chunks, its batch builds the
inputs, runs the forward and selects the tokens) and `retire`s the rows that finished; it hands the tokens to the
callers itself. A scheduler knows rows and requests, never threads, event loops or deadlines.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, Iterator, Literal, Protocol, TypeVar

from service.requests import GenerationRequest
from service.rows import Row

BatchingPolicy = Literal["mixed", "per-task"]
Layout = Literal["slots", "padded"]  # chosen at start-up: service.startup.check_model


class WaitingItem(Protocol):
    """What a scheduler reads of a waiting request (the engine's handle)."""

    @property
    def request(self) -> GenerationRequest: ...

    @property
    def enqueued_at(self) -> float: ...  # time.monotonic() when it was accepted


W = TypeVar("W", bound=WaitingItem)


class Waiting(Protocol[W]):
    """The engine's waiting queue, oldest first (a deque): what admission needs of it."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[W]: ...

    def __getitem__(self, index: int) -> W: ...

    def popleft(self) -> W: ...

    def clear(self) -> None: ...

    def extend(self, items: Iterable[W]) -> None: ...


class Arrival(enum.Enum):
    """What waiting for a new request ended with (`WaitForArrival`)."""

    ARRIVED = "arrived"  # something came in (a request, now in the waiting queue, or a wake-up)
    TIMED_OUT = "timed_out"
    STOPPING = "stopping"  # the engine is asked to stop: admit nothing more


WaitForArrival = Callable[[float], Arrival]  # block up to this many seconds for the next inbox item


@dataclass
class StepOutcome(Generic[W]):
    """What one `Scheduler.step` did, for the engine's delivery and stats."""

    stepped: list[Row] = field(default_factory=list)  # rows with new tokens to hand out
    rows: int = 0  # rows in the forward pass; 0: no forward ran
    prefilling: bool = False  # the pass carried prompt tokens
    seconds: float = 0.0  # the pass's duration (schedule, inputs, forward, token selection)
    started: list[W] = field(default_factory=list)  # requests whose rows began running in this pass
    batches_started: int = 0  # per-task policy: static batches formed by this pass
    failed: list[W] = field(default_factory=list)  # admitted requests whose rows could not be built ...
    error: BaseException | None = None  # ... and why (the running rows are unharmed)


class Scheduler(ABC, Generic[W]):
    """A batch layout's running rows and its decisions: admission, what each forward carries, retirement, memory.

    `owners` maps each running row to the waiting item it was admitted from (rows compare by identity)."""

    owners: dict[Row, W]

    @property
    @abstractmethod
    def rows(self) -> list[Row]:
        """The running rows, in the order their tokens are handed out and retired."""

    def __len__(self) -> int:
        return len(self.rows)

    @abstractmethod
    def admit(self, waiting: Waiting[W], wait_for_arrival: WaitForArrival) -> list[W]:
        """Take the requests that may start now from the front of `waiting` (FIFO: none overtakes an older one that
        does not fit) and return them; they run from the next `step` on."""

    @abstractmethod
    def step(self) -> StepOutcome[W]:
        """Run at most one forward pass over the running (and newly admitted) rows."""

    @abstractmethod
    def retire(self, rows: list[Row]) -> list[W]:
        """Remove finished rows, freeing their KV; returns their owners, in the order of `rows`."""

    @abstractmethod
    def memory_in_use(self) -> int:
        """KV bytes held now, padding and the prefix bank included."""

    def prefix_bank_bytes(self) -> int:
        """Of `memory_in_use`, the bytes of prefixes held once per task (layouts with a prefix bank)."""
        return 0

    @abstractmethod
    def clear(self) -> list[W]:
        """Drop every row and admitted request (a failed step, or the engine stopping); returns their owners."""
