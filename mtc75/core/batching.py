"""The batch scheduler: waiting messages handed out as batches of one partition, in offset order (pure: no
threads of its own, no Kafka, no clock -- callers pass ``now``).

With ``BATCH_SIZE`` > 1 a batch handler is called with a list of messages. A batch holds at most ``limit``
messages of one partition assignment, in offset order, and is *ready* once it is full or its oldest message
has waited ``wait`` seconds (BATCH_WAIT): under a backlog batches fill, when messages trickle in a batch
waits at most that long. Partitions with a ready batch take turns (a ring), so one partition's backlog does
not starve another's.

The ``ORDERING`` modes keep their meaning through *lanes* (as in mtc75/core/ordering.py): ``unordered`` --
one lane per partition that never blocks, so several batches of one partition may run at once;
``partition`` -- one lane per partition, busy while its batch runs (one batch per partition in flight);
``key`` -- one lane per key within a partition, busy while a batch holding its messages runs, so a batch
never holds a message whose key is running elsewhere, and each key's messages stay in offset order within
and across batches (a message without a key is its own key and never waits). A batch that is retried or
split holds its lanes until it is released once, whole (the dispatcher keeps its pieces, not this).

Thread contract: every method is called with the dispatcher's lock held (``LOCK_FREE_TAKE`` and
``LOCK_FREE_RELEASE`` are False); ``len``, ``ready`` and ``next_due`` may be read without it, as hints.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from mtc75.core.scheduler import CountedScheduler
from mtc75.core.work import Work

_NO_KEY = object()  # the lane of keyless messages in key mode: each is its own key, so it never blocks


class _Lane:
    """Waiting Works of one key (or partition), in offset order; busy while a batch holding them runs."""

    __slots__ = ("key", "queue", "busy", "blocking")

    def __init__(self, key: Hashable, blocking: bool) -> None:
        self.key = key
        self.queue: deque[Work] = deque()
        self.busy = False
        self.blocking = blocking  # False: unordered, or a keyless message (never busy)


class _Part:
    """One partition assignment: its lanes, the lanes that may give messages now, and their count."""

    __slots__ = ("state", "lanes", "order", "ready", "in_ring", "due")

    def __init__(self, state: object) -> None:
        self.state = state
        self.lanes: dict[Hashable, _Lane] = {}
        self.order: deque[_Lane] = deque()  # lanes with waiting messages and not busy, next to serve first
        self.ready = 0  # messages in those lanes
        self.in_ring = False  # a batch may be taken now
        self.due: float | None = None  # waiting for more: when its oldest message has waited ``wait``


class BatchScheduler(CountedScheduler):
    """Batches of one partition for a batch handler (see the module notes)."""

    takes_chunks = True  # fetched runs are welcome whole: they end up in batches (key mode splits them by key)

    def __init__(self, ordering: str, limit: int, wait: float) -> None:
        if limit < 1:
            raise ValueError(f"batch limit must be >= 1, got {limit}")
        self.ordering = ordering
        self.limit = limit  # BATCH_SIZE
        self.wait = wait  # BATCH_WAIT
        self._parts: dict[object, _Part] = {}  # PartitionState -> _Part (identity: a new assignment is new)
        self._ring: deque[_Part] = deque()  # partitions with a ready batch, next to serve first
        self._pending: set[_Part] = set()  # partitions with messages waiting to fill (a due time)
        self._busy: dict[Work, list[_Lane]] = {}  # batches taken and not released -> the lanes they hold
        super().__init__()  # _ready: messages of partitions in the ring

    # -- the scheduler interface ------------------------------------------------------------------------

    def put(self, items: Iterable[Work]) -> None:
        """Add fetched Works (``put_at`` set by the caller); a partition's batch is ready once full or due."""
        touched: list[_Part] = []
        if self.ordering == "key":  # a fetched run holds several keys: each message to its own key's lane
            items = [single for work in items for single in work.split(1)]
        for work in items:
            part = self._part(work)
            lane = self._lane(part, work)
            lane.queue.append(work)
            self._waiting += work.size
            if not lane.busy:
                if len(lane.queue) == 1:
                    part.order.append(lane)
                self._add_ready(part, work.size)
                if not touched or touched[-1] is not part:
                    touched.append(part)
        for part in touched:
            self._settle(part)

    def requeue(self, items: list[Work]) -> None:
        """Works to run again before anything fetched since (ready at once)."""
        for work in reversed(items):
            part = self._part(work)
            lane = self._lane(part, work)
            lane.queue.appendleft(work)
            self._waiting += work.size
            if not lane.busy:
                if lane in part.order:
                    part.order.remove(lane)
                part.order.appendleft(lane)
                self._add_ready(part, work.size)
            if part.ready and not part.in_ring:
                self._pending.discard(part)
                self._to_ring(part)

    def take(self) -> Work:
        """The next ready batch (IndexError when none is): one partition's messages, in offset order."""
        ring = self._ring
        if not ring:
            raise IndexError("no batch ready")
        part = ring.popleft()
        part.in_ring = False
        self._ready -= part.ready
        works: list[Work] = []
        used: list[_Lane] = []  # the lanes that gave messages, in the order they first did
        seen: set[int] = set()
        budget = self.limit
        # Fill in offset order across the lanes that may give messages (one lane unless ORDERING=key): the
        # smallest head first, so a batch is the partition's oldest messages but for the keys running elsewhere.
        heads = [(lane.queue[0].offset, i, lane) for i, lane in enumerate(part.order)]
        heapq.heapify(heads)
        while budget and heads:
            _, i, lane = heapq.heappop(heads)
            work = lane.queue[0]
            if work.size > budget:  # a fetched run larger than what is left of the batch: split it
                work, lane.queue[0] = work.part(0, budget), work.part(budget, work.size)
            else:
                lane.queue.popleft()
                if lane.queue:
                    heapq.heappush(heads, (lane.queue[0].offset, i, lane))
            works.append(work)
            budget -= work.size
            if id(lane) not in seen:
                seen.add(id(lane))
                used.append(lane)
        held = [lane for lane in used if lane.blocking]
        for lane in held:
            lane.busy = True
            part.ready -= sum(w.size for w in lane.queue)  # waits behind this batch now: not ready
        part.order = deque(lane for lane in part.order if lane.queue and not lane.busy)
        taken = self.limit - budget
        part.ready -= taken
        self._waiting -= taken
        batch = Work.merged(works)
        if held:
            self._busy[batch] = held
        part.due = None
        self._settle(part)
        return batch

    def release(self, work: Work) -> None:
        """A batch is done for good: the lanes it held may give messages again."""
        lanes = self._busy.pop(work, None)
        if not lanes:
            return
        part = self._parts.get(work.state)
        for lane in lanes:
            lane.busy = False
            if part is None:
                continue
            if lane.queue:
                part.order.append(lane)
                self._add_ready(part, sum(w.size for w in lane.queue))
            else:
                self._forget(part, lane)
        if part is not None:
            self._settle(part)

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        """Remove waiting Works (``drop`` selects; all without one); lanes held by running batches stay busy."""
        dropped: list[Work] = []
        for part in list(self._parts.values()):
            for lane in list(part.lanes.values()):
                kept: deque[Work] = deque()
                for work in lane.queue:
                    (dropped if drop is None or drop(work) else kept).append(work)
                lane.queue = kept
                if not lane.queue and not lane.busy:
                    self._forget(part, lane)
            part.order = deque(lane for lane in part.order if lane.queue)
            part.ready = sum(w.size for lane in part.order for w in lane.queue)
            if part.in_ring:
                part.in_ring = False
                self._ring.remove(part)
            self._pending.discard(part)
            part.due = None
            self._settle(part)
        self._waiting -= sum(w.size for w in dropped)
        self._ready = sum(p.ready for p in self._ring)
        return dropped

    # -- batch timing -----------------------------------------------------------------------------------

    def promote(self, now: float) -> int:
        """Partitions whose oldest waiting message has waited BATCH_WAIT get a ready batch; returns how many."""
        due = [part for part in self._pending if part.due is not None and part.due <= now]
        for part in due:
            self._pending.discard(part)
            self._to_ring(part)
        return len(due)

    def next_due(self) -> float | None:
        """When the next waiting batch is due (None: none waits)."""
        dues = [part.due for part in self._pending if part.due is not None]
        return min(dues) if dues else None

    def retune(self, limit: int, wait: float) -> None:
        """BATCH_SIZE and BATCH_WAIT changed live: from the next batch on."""
        self.limit, self.wait = max(1, limit), wait
        for part in list(self._pending):
            self._pending.discard(part)
            part.due = None
            self._settle(part)

    # -- internals --------------------------------------------------------------------------------------

    def _part(self, work: Work) -> _Part:
        part = self._parts.get(work.state)
        if part is None:
            part = self._parts[work.state] = _Part(work.state)
        return part

    def _lane(self, part: _Part, work: Work) -> _Lane:
        key = self._key(work)
        lane = part.lanes.get(key)
        if lane is None:
            blocking = self.ordering != "unordered" and key is not _NO_KEY
            lane = part.lanes[key] = _Lane(key, blocking)
        return lane

    def _key(self, work: Work) -> Hashable:
        if self.ordering == "unordered":
            return None
        if self.ordering == "partition":
            return "partition"
        key: Any = work.message.key()
        return _NO_KEY if key is None else key

    def _add_ready(self, part: _Part, count: int) -> None:
        part.ready += count
        if part.in_ring:
            self._ready += count

    def _settle(self, part: _Part) -> None:
        """Put ``part`` where its messages say: in the ring (a batch is ready), pending (filling), or nowhere."""
        if part.in_ring:
            return
        if part.ready >= self.limit or (part.ready and self.wait <= 0):
            self._pending.discard(part)
            self._to_ring(part)
        elif part.ready:
            if part.due is None:
                part.due = min(w.put_at for lane in part.order for w in lane.queue) + self.wait
            self._pending.add(part)
        else:
            self._pending.discard(part)
            part.due = None
            if not part.lanes:
                self._parts.pop(part.state, None)

    def _to_ring(self, part: _Part) -> None:
        part.in_ring = True
        part.due = None
        self._ring.append(part)
        self._ready += part.ready

    def _forget(self, part: _Part, lane: _Lane) -> None:
        part.lanes.pop(lane.key, None)

