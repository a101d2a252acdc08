"""The order in which queued requests get a slot: one small interface, FIFO today.

`Admission` owns the bounds (how many run, how many may wait) and the waiting; a
`QueuePolicy` only decides *which* waiting ticket goes next and where a ticket stands.
Fair or priority scheduling between principals is another class with these methods.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

T = TypeVar("T")


class QueuePolicy(Protocol[T]):
    """Holds waiting items; every method is synchronous and cheap."""

    def push(self, item: T) -> None:
        """`item` starts waiting."""

    def remove(self, item: T) -> bool:
        """`item` stops waiting (it left); False if it was not waiting."""

    def pop(self) -> T | None:
        """The item that goes next, no longer waiting; None if nothing waits."""

    def position(self, item: T) -> int:
        """How many items go before `item` (0: it is next, or it is not waiting)."""

    def __len__(self) -> int: ...


class FifoPolicy(QueuePolicy[T]):
    """First come, first served."""

    def __init__(self) -> None:
        self._items: dict[T, None] = {}  # insertion order is arrival order

    def push(self, item: T) -> None:
        self._items[item] = None

    def remove(self, item: T) -> bool:
        if item not in self._items:
            return False
        del self._items[item]
        return True

    def pop(self) -> T | None:
        for item in self._items:
            del self._items[item]
            return item
        return None

    def position(self, item: T) -> int:
        for index, waiting in enumerate(self._items):
            if waiting is item:
                return index
        return 0

    def __len__(self) -> int:
        return len(self._items)
