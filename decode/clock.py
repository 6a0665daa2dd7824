"""`Clock`: the one timer of the decode loops, so that a loop reads as its algorithm with its phases named.

    clock = Clock()
    with clock.phase("compute", "head"):   # the block's wall and thread-CPU seconds go to both phases
        ...
    clock.wall["compute"], clock.cpu["compute"], clock.count["head"], clock.mean("compute"), clock.elapsed()
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Hashable, Iterator


class Lap:
    """One timed block: its wall seconds (`s`) once it has ended."""

    s: float = 0.0


class Clock:
    """Wall and thread-CPU seconds of named phases (summed, and counted), from `start`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wall: dict[Hashable, float] = defaultdict(float)
        self.cpu: dict[Hashable, float] = defaultdict(float)
        self.count: dict[Hashable, int] = defaultdict(int)

    @contextlib.contextmanager
    def phase(self, *names: Hashable) -> Iterator[Lap]:
        """Time the block and add it to each of `names` (none: only the yielded Lap has it)."""
        lap, wall, cpu = Lap(), time.perf_counter(), time.thread_time()
        try:
            yield lap
        finally:
            lap.s, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            for name in names:
                self.add(name, lap.s, cpu)

    def add(self, name: Hashable, seconds: float, cpu: float = 0.0) -> None:
        self.wall[name] += seconds
        self.cpu[name] += cpu
        self.count[name] += 1

    def mean(self, name: Hashable) -> float:
        return self.wall[name] / self.count[name] if self.count[name] else 0.0

    def keys(self, kind: str) -> list:
        """The second parts of the phases named (kind, key), sorted: e.g. eesd's verify passes by length."""
        return sorted(name[1] for name in self.count if isinstance(name, tuple) and name[0] == kind)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
