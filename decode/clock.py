"""`Clock`: the one timer of the decode loops, so that a loop reads as its algorithm with its phases named.

    clock = Clock()
    with clock.phase("compute", "head"):   # the block's wall and thread-CPU seconds go to both phases
        ...
    clock.wall["compute"], clock.cpu["compute"], clock.count["head"], clock.mean("compute"), clock.elapsed()
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable


class Lap:
    """One timed block (`Clock.phase`): its wall seconds, `s`, once it has ended."""

    __slots__ = ("clock", "names", "s", "_wall", "_cpu")

    def __init__(self, clock: "Clock", names: tuple):
        self.clock, self.names, self.s = clock, names, 0.0

    def __enter__(self) -> "Lap":
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc) -> None:
        self.s, cpu = time.perf_counter() - self._wall, time.thread_time() - self._cpu
        for name in self.names:
            self.clock.add(name, self.s, cpu)


class Clock:
    """Wall and thread-CPU seconds of named phases (summed, and counted), from `start`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wall: dict[Hashable, float] = defaultdict(float)
        self.cpu: dict[Hashable, float] = defaultdict(float)
        self.count: dict[Hashable, int] = defaultdict(int)

    def phase(self, *names: Hashable) -> Lap:
        """`with clock.phase(...) as lap:` times the block and adds it to each of `names` (none: only `lap.s`)."""
        return Lap(self, names)

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
