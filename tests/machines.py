"""State machines shared by the state-machine tests. Not a test module."""

from __future__ import annotations

import heapq
from typing import Any

import walstore


class PQ:
    """A priority queue: ties pop in push order; pop is validated (the queue must not be empty)."""

    def __init__(self) -> None:
        self.heap: list[list[Any]] = []
        self.pushed = 0

    @walstore.operation
    def push(self, priority: int, item: str) -> None:
        heapq.heappush(self.heap, [priority, self.pushed, item])
        self.pushed += 1

    @walstore.operation
    def pop(self) -> str:
        item: str = heapq.heappop(self.heap)[2]
        return item

    @pop.validator
    def check_pop(self) -> None:
        if not self.heap:
            raise IndexError("pop from an empty queue")

    def contents(self) -> list[tuple[int, str]]:
        """(priority, item) in pop order: a read, not an operation."""
        return [(p, item) for p, _n, item in sorted(self.heap)]
