"""Retry policy and the delay queue of messages waiting for their next attempt: pure, no Kafka, no clock.

Thread contract: :class:`RetryPolicy` is immutable after construction and may be called from any
thread (workers ask it after a failure; ``random.random`` is thread-safe). :class:`DelayQueue` has
no lock: its owner supplies one (the dispatcher's); ``len`` and ``next_due`` may be read without it
as hints (the heap can change meanwhile; a decision re-reads under the lock).

A failed message must not hold a worker thread while it waits for its backoff, so it waits in a
:class:`DelayQueue` (a heap ordered by due time) and goes back to the backlog when due. Until it is
finally done it stays outstanding in the offset tracker, so the commit watermark cannot pass it.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from mtc75.core.work import Work

T = TypeVar("T")

FAILURE_MODES = ("dlq", "skip", "stop")


class RetryPolicy:
    """Up to ``max_attempts`` tries; exponential backoff from ``base``, capped at ``cap``, jittered.

    The delay before attempt ``n + 1`` is ``min(cap, base * 2 ** (n - 1))`` scaled by a random factor
    in ``[1 - jitter, 1]``, so consumers that failed together do not all retry in the same instant.
    """

    def __init__(
        self,
        max_attempts: int,
        base: float,
        cap: float,
        jitter: float = 0.5,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if base < 0:
            raise ValueError(f"base must be >= 0, got {base}")
        if cap < 0:
            raise ValueError(f"cap must be >= 0, got {cap}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {jitter}")
        self.max_attempts = max_attempts
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self._rand = rand

    def should_retry(self, attempts: int) -> bool:
        """Whether a message that has failed ``attempts`` times gets another try."""
        return attempts < self.max_attempts

    def next_delay(self, work: Work, now: float) -> float | None:
        """Seconds before a failed Work's next attempt (``work.attempts`` failures so far), or None when it
        gets none here. A subclass may decline more (share mode: a retry must end within the lock)."""
        return self.delay(work.attempts) if self.should_retry(work.attempts) else None

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failure (``attempts`` >= 1)."""
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        # 2 ** 64 already exceeds any sane cap; bounding the exponent keeps the float finite.
        raw = min(self.cap, self.base * 2.0 ** min(attempts - 1, 64))
        return raw * (1.0 - self.jitter * self._rand())


class DelayQueue(Generic[T]):
    """Items waiting until a due time; the caller supplies ``now`` and any locking."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()  # ties keep insertion order and never compare items

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))

    def next_due(self) -> float | None:
        try:
            return self._heap[0][0]  # may be read without the lock: the heap can empty meanwhile
        except IndexError:
            return None

    def pop_due(self, now: float) -> list[T]:
        """Items whose time has come, earliest first."""
        heap = self._heap
        out: list[T] = []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Drop and return the items matching ``predicate`` (e.g. those of a revoked partition), earliest
        due first."""
        dropped = [entry for entry in self._heap if predicate(entry[2])]
        if dropped:
            self._heap = [entry for entry in self._heap if not predicate(entry[2])]
            heapq.heapify(self._heap)
            dropped.sort()  # (due, seq): ties keep insertion order, items are never compared
        return [entry[2] for entry in dropped]

    def items(self) -> Iterable[T]:
        return (entry[2] for entry in self._heap)


class DelayedWorks(DelayQueue["Work"]):
    """A delay queue of Works that also counts their messages (``messages``: a chunk or a batch counts its
    own), kept exact by every push and removal; the caller's lock guards it, as for :class:`DelayQueue`."""

    def __init__(self) -> None:
        super().__init__()
        self.messages = 0

    def push(self, due: float, item: Work) -> None:
        super().push(due, item)
        self.messages += item.size

    def pop_due(self, now: float) -> list[Work]:
        due = super().pop_due(now)
        if due:
            self.messages -= sum(work.size for work in due)
        return due

    def remove_if(self, predicate: Callable[[Work], bool]) -> list[Work]:
        removed = super().remove_if(predicate)
        if removed:
            self.messages -= sum(work.size for work in removed)
        return removed
