"""What else the machine was doing during a timed run (Linux /proc; None elsewhere), and waiting for it to go quiet.

A run's `other_cores_busy` is the whole machine's busy CPU time during the run, minus this process's and the
processes it names (the llama-server peer), divided by the wall time: 0.0 on a quiet machine, 1.0 when another job
kept one core busy throughout. Benchmarks on shared machines should report it beside their numbers."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS


def _process_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


@dataclass
class CpuWatch:
    """Started before a run, `other_cores_busy()` after it."""

    pids: tuple[int, ...]
    machine_s: float | None
    own_s: float
    peer_s: float
    started: float

    @classmethod
    def start(cls, *pids: int) -> CpuWatch:
        pids = (os.getpid(), *pids)
        peer = sum(_process_cpu_s(p) for p in pids[1:])
        return cls(pids, _machine_busy_s(), _process_cpu_s(pids[0]) + peer, peer, time.monotonic())

    def peer_cpu_s(self) -> float:
        """CPU seconds the named processes (not this one) used since the start: a peer server left idle should use
        none while the other system runs."""
        return round(sum(_process_cpu_s(p) for p in self.pids[1:]) - self.peer_s, 2)

    def own_cpu_s(self) -> float:
        """CPU seconds this process and the named ones used since the start (spin-waiting included)."""
        return round(sum(_process_cpu_s(p) for p in self.pids) - self.own_s, 2)

    def other_cores_busy(self) -> float | None:
        machine = _machine_busy_s()
        wall = time.monotonic() - self.started
        if machine is None or self.machine_s is None or wall <= 0:
            return None
        own = sum(_process_cpu_s(p) for p in self.pids) - self.own_s
        return round(max(machine - self.machine_s - own, 0.0) / wall, 2)


def wait_until_quiet(max_wait_s: float, *, busy_below: float = 0.2, sample_s: float = 2.0) -> float | None:
    """Wait (at most `max_wait_s`) until other processes keep fewer than `busy_below` cores busy over `sample_s`;
    returns the last sample's busy cores (None where /proc cannot tell)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        watch = CpuWatch.start()
        time.sleep(sample_s)
        busy = watch.other_cores_busy()
        if busy is None or busy < busy_below or time.monotonic() >= deadline:
            if busy is not None and busy >= busy_below:
                logger.warning("machine still busy (%.2f cores used by others) after waiting %.0f s", busy, max_wait_s)
            return busy
