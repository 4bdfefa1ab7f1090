"""Ordering modes and fair round-robin: schedulers behind the dispatcher (pure: no threads, no Kafka, no clock).

Three implementations of :class:`mtc75.core.scheduler.Scheduler`, chosen by ``ORDERING``
(:func:`new_scheduler`):

- ``unordered`` -- :class:`FairFifoScheduler`: every waiting message may start; partitions take turns.
- ``partition`` -- :class:`PartitionScheduler`: at most one message of a partition in flight, in offset order.
- ``key`` -- :class:`KeyScheduler`: messages of one key (within a partition) run one after another in offset
  order; different keys run in parallel. A message without a key (``key() is None``) is its own key: it
  waits for nothing and nothing waits for it, as in unordered mode.

How order holds: the ordered schedulers keep one *lane* per key (or per partition): a FIFO of its waiting
messages, in put order (= offset order: the poll thread puts each partition's messages as fetched). A lane
is *busy* from the ``take`` of its head until ``release`` of that message; a busy lane hands out nothing.
A message waiting for a retry was taken and not released, so its lane stays busy through the backoff,
and ``requeue`` puts it back at the front of its lane: the next attempt runs before anything after it.

How fairness holds: a lane with a waiting message and nothing running is *ready*. Ready lanes sit in a
ring per partition, and the partitions with a ready lane in a ring of partitions; ``take`` serves the
partition at the front of the outer ring, the lane at the front of its inner ring, and moves both to the
back. So one partition (or one hot key) never makes another wait for more than one turn per partition.

Counts: ``ready`` is the number of messages ``take`` could hand out *now*, one per ready lane -- what
free threads can start; ``blocked`` is every other waiting message (behind a running message of its key
or partition, or behind an earlier waiting one of its lane). The dispatcher counts both toward its
backlog bound, so a hot key holds the consumer's memory to that bound: with the backlog at its bound
and no more ``ready`` than free threads, the engine pauses rather than piling up blocked messages.

Thread contract: :class:`PartitionScheduler` and :class:`KeyScheduler` are called only with the
dispatcher's lock held (``LOCK_FREE_TAKE`` and ``LOCK_FREE_RELEASE`` are False).
:class:`FairFifoScheduler` keeps the unordered hot path off the dispatcher's lock: workers ``take``
from a short interleaved *front* deque under the scheduler's own small lock (one take per chunk on the
fast path, mtc75/core/scheduler.py); ``put``/``requeue``/``purge`` (dispatcher lock held) and a take
that finds the front empty refill it from the per-partition queues. Its ``release`` is a no-op
(``LOCK_FREE_RELEASE``).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from mtc75.core.scheduler import CountedScheduler, FifoScheduler, Scheduler, size_of
from mtc75.core.work import Work

ORDERINGS = ("unordered", "partition", "key")

# Fair intake (mtc75/kafka/fairness.py): a partition may hold at least this many seconds of work in the
# backlog before its fetched runs are cut for a partition that waits. Demo shape (4 threads, 0.1 s,
# 3 partitions, 600 messages): the last partition waited 9.9 s between two messages without a cut,
# 1.x s with it (tests/test_ordering_e2e.py); at no-op rates the share exceeds any backlog: never cut.
FAIR_SECONDS = 0.5

# Unordered: messages interleaved ahead of the lock-free take. A partition that shows up behind a burst
# of another waits for at most this many messages (or chunks, on the fast path: mtc75/core/work.py) to
# start; the workers refill once per FRONT takes.
FRONT = 16


class _Part:
    """One partition assignment's ready lanes (a ring) and how many lanes it has."""

    __slots__ = ("state", "ready", "in_ring", "lanes")

    def __init__(self, state: object) -> None:
        self.state = state
        self.ready: deque[_Lane] = deque()
        self.in_ring = False
        self.lanes = 0


class _Lane:
    """The waiting messages of one key (or partition), in offset order, and whether one runs."""

    __slots__ = ("key", "part", "queue", "busy", "ready")

    def __init__(self, key: Hashable, part: _Part) -> None:
        self.key = key
        self.part = part
        self.queue: deque[Work] = deque()
        self.busy = False  # its last taken message is running, or waiting for a retry
        self.ready = False  # in part.ready


class _LaneScheduler(CountedScheduler):
    """Lanes with one message in flight each, served round-robin across partitions and lanes."""

    takes_chunks = False  # one message per lane step

    def __init__(self) -> None:
        self._parts: dict[object, _Part] = {}  # PartitionState -> _Part (identity: a new assignment is new)
        self._lanes: dict[Hashable, _Lane] = {}
        self._ring: deque[_Part] = deque()  # partitions with a ready lane, next to serve first
        self._busy: dict[Work, _Lane] = {}  # taken and not released -> its lane
        super().__init__()

    def _key(self, work: Work) -> Hashable:
        raise NotImplementedError

    # -- interface ------------------------------------------------------------------------------------

    def put(self, items: Iterable[Work]) -> None:
        # The poll thread's per-message path, with the dispatcher's lock held: lookups bound once and
        # the new-ready step inlined (10 000 keys, no-op handler: key mode ran at 0.67-0.70 of unordered).
        lanes = self._lanes
        key_of = self._key
        ring = self._ring
        count = ready = 0
        for work in items:
            key = key_of(work)
            lane = lanes.get(key)
            if lane is None:
                lane = self._new_lane(key, work.state)
            lane.queue.append(work)
            count += 1
            if not lane.busy and not lane.ready:
                lane.ready = True
                ready += 1
                part = lane.part
                part.ready.append(lane)
                if not part.in_ring:
                    part.in_ring = True
                    ring.append(part)
        self._waiting += count
        self._ready += ready

    def requeue(self, items: list[Work]) -> None:
        for work in reversed(items):
            lane = self._busy.pop(work, None)
            if lane is None:  # not known as taken (cannot happen through the dispatcher): as if fetched first
                lane = self._lane(work)
            else:
                lane.busy = False
            lane.queue.appendleft(work)
            self._waiting += 1
            if not lane.busy and not lane.ready:
                self._make_ready(lane, front=True)

    def take(self) -> Work:
        ring = self._ring
        if not ring:
            raise IndexError("nothing may start now")
        part = ring.popleft()
        lane = part.ready.popleft()
        if part.ready:
            ring.append(part)  # served: to the back, behind every other partition with work
        else:
            part.in_ring = False
        lane.ready = False
        lane.busy = True
        work = lane.queue.popleft()
        self._busy[work] = lane
        self._waiting -= 1
        self._ready -= 1
        return work

    def release(self, work: Work) -> None:
        lane = self._busy.pop(work, None)
        if lane is None:
            return  # released twice, or never taken here: nothing it blocks
        lane.busy = False
        if lane.queue:
            self._make_ready(lane, front=False)  # its next message, behind the lanes that waited meanwhile
        else:
            self._forget(lane)

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        """Remove waiting messages; a lane whose message runs stays busy until that message's ``release``."""
        dropped: list[Work] = []
        for lane in list(self._lanes.values()):
            if drop is None:
                dropped.extend(lane.queue)
                lane.queue.clear()
            elif lane.queue:
                kept: deque[Work] = deque()
                for work in lane.queue:
                    (dropped if drop(work) else kept).append(work)
                lane.queue = kept
            if not lane.queue and not lane.busy:
                self._forget(lane)
        ring: deque[_Part] = deque()
        ready = 0
        for part in self._ring:  # keep the turn order of what is left
            for lane in part.ready:
                lane.ready = bool(lane.queue)
            part.ready = deque(lane for lane in part.ready if lane.ready)
            part.in_ring = bool(part.ready)
            if part.in_ring:
                ring.append(part)
                ready += len(part.ready)
        self._ring = ring
        self._ready = ready
        self._waiting -= len(dropped)
        return dropped

    def behind(self, work: Work) -> int:
        lane = self._busy.get(work)
        return 0 if lane is None else len(lane.queue)

    @property
    def running(self) -> int:
        """Messages taken and not yet released (running, or waiting for a retry)."""
        return len(self._busy)

    @property
    def lanes(self) -> int:
        """Keys (or partitions) with a message waiting or running: what the scheduler holds in memory."""
        return len(self._lanes)

    # -- lanes ----------------------------------------------------------------------------------------

    def _lane(self, work: Work) -> _Lane:
        key = self._key(work)
        lane = self._lanes.get(key)
        return lane if lane is not None else self._new_lane(key, work.state)

    def _new_lane(self, key: Hashable, state: object) -> _Lane:
        part = self._parts.get(state)
        if part is None:
            part = self._parts[state] = _Part(state)
        part.lanes += 1
        lane = self._lanes[key] = _Lane(key, part)
        return lane

    def _make_ready(self, lane: _Lane, front: bool) -> None:
        part = lane.part
        lane.ready = True
        self._ready += 1
        if front:
            part.ready.appendleft(lane)
        else:
            part.ready.append(lane)
        if not part.in_ring:
            part.in_ring = True
            if front:
                self._ring.appendleft(part)
            else:
                self._ring.append(part)

    def _forget(self, lane: _Lane) -> None:
        """The lane has nothing waiting or running: drop it (10,000 keys seen once cost nothing after)."""
        if self._lanes.pop(lane.key, None) is None:
            return
        part = lane.part
        part.lanes -= 1
        if part.lanes == 0 and self._parts.get(part.state) is part:
            del self._parts[part.state]


class PartitionScheduler(_LaneScheduler):
    """``ORDERING=partition``: at most one message of a partition assignment in flight, in offset order."""

    def _key(self, work: Work) -> Hashable:
        return work.state


class KeyScheduler(_LaneScheduler):
    """``ORDERING=key``: one message per (partition, key) in flight, in offset order; keyless messages free.

    The lane is per partition assignment and key: Kafka orders a key only within its partition, and a
    re-assigned partition starts clean. A message whose ``key()`` is None gets a lane of its own (the
    ``Work`` itself is the key), so it runs as soon as a thread is free, like in unordered mode.
    """

    def _key(self, work: Work) -> Hashable:
        key = work.message.key()
        return (work.state, key if key is not None else work)


class FairFifoScheduler:
    """``ORDERING=unordered``: every waiting message may start; partitions take turns (see the module notes).

    Fetched messages (or chunks) wait in one FIFO per partition assignment; up to ``FRONT`` of them are
    interleaved round-robin into the front deque, which workers take from. Compared with
    :class:`mtc75.core.scheduler.FifoScheduler` (one FIFO, first fetched first run) the extra work is one
    append per message on the refilling thread (BENCHMARKS.md, ordering).
    """

    LOCK_FREE_TAKE = True  # under its own lock (mtc75/core/scheduler.py)
    LOCK_FREE_RELEASE = True  # nothing is ever blocked: release has nothing to guard
    takes_chunks = True  # a chunk is one item of its partition's queue and of the front

    def __init__(self, front: int = FRONT) -> None:
        if front < 1:
            raise ValueError(f"front must be >= 1, got {front}")
        self._size = front
        self._lock = threading.Lock()  # guards everything below
        self._front: deque[Work] = deque()  # the next ones to take, interleaved
        self._queues: dict[object, deque[Work]] = {}  # PartitionState -> its messages behind the front
        self._ring: deque[deque[Work]] = deque()  # the non-empty queues, next to serve first
        self._count = 0  # messages (not chunks) in _front and _queues (read without the lock as a hint)

    def put(self, items: Iterable[Work]) -> None:
        with self._lock:
            queues = self._queues
            ring = self._ring
            count = 0
            queue: deque[Work] | None = None
            state: object = None
            for work in items:
                if work.state is not state:  # chunks of one partition: one lookup per chunk
                    state = work.state
                    queue = queues.get(state)
                    if queue is None:
                        queue = queues[state] = deque()
                    if not queue:
                        ring.append(queue)
                assert queue is not None
                queue.append(work)
                count += work.size
            self._count += count
            self._fill()

    def _fill(self) -> None:
        """Caller holds self._lock. Top the front up to its size, one message (or chunk) per partition in turn."""
        front = self._front
        ring = self._ring
        room = self._size - len(front)
        while room > 0 and ring:
            queue = ring.popleft()
            front.append(queue.popleft())
            room -= 1
            if queue:
                ring.append(queue)

    def requeue(self, items: list[Work]) -> None:
        with self._lock:
            self._front.extendleft(reversed(items))  # retries first: older than anything fetched since
            self._count += sum(map(size_of, items))

    def take(self) -> Work:
        with self._lock:
            front = self._front
            if not front:
                self._fill()
            work = front.popleft()  # IndexError when nothing is left
            self._count -= work.size
            return work

    def release(self, work: Work) -> None:
        pass  # nothing is ever blocked

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        with self._lock:
            front = list(self._front)
            back = [work for queue in self._ring for work in queue]
            self._front.clear()
            self._queues.clear()
            self._ring.clear()
            self._count = 0
            if drop is None:
                return front + back
            dropped: list[Work] = []
            kept_front: list[Work] = []
            for work in front:
                (dropped if drop(work) else kept_front).append(work)
            kept_back: list[Work] = []
            for work in back:
                (dropped if drop(work) else kept_back).append(work)
            self._front.extend(kept_front)
            for work in kept_back:  # the turn order is lost, the order within each partition kept
                queue = self._queues.get(work.state)
                if queue is None:
                    queue = self._queues[work.state] = deque()
                    self._ring.append(queue)
                queue.append(work)
            self._count = sum(map(size_of, kept_front)) + sum(map(size_of, kept_back))
            self._fill()
        return dropped

    def __len__(self) -> int:
        return self._count

    @property
    def ready(self) -> int:
        return self._count

    @property
    def blocked(self) -> int:
        return 0

    def behind(self, work: Work) -> int:
        return 0  # nothing waits behind another


def fair_share(high: int, limit: int, partitions: int, rate: float, seconds: float = FAIR_SECONDS) -> int:
    """Messages one partition may have in flight before a waiting partition goes first.

    Its part of the backlog's high watermark, but never less than the thread count (each thread may
    have one) nor than ``seconds`` of work at the measured ``rate`` (fast handlers are never cut).
    """
    return max(limit, high // max(1, partitions), int(rate * seconds))


def fair_cuts(in_flight: Mapping[Any, int], runs: Iterable[tuple[Any, list[int]]], share: int) -> dict[Any, int]:
    """``{partition: first offset over its share}`` for fetched ``runs`` (partition, offsets) in fetch order.

    ``in_flight``: the partition's messages already fetched and not finished. A partition missing from
    it is not ours: never cut (its messages are dropped anyway). Runs of a partition after its cut are
    over the share too.
    """
    seen: dict[Any, int] = {}
    cuts: dict[Any, int] = {}
    for tp, offsets in runs:
        if tp in cuts or tp not in in_flight:
            continue
        before = seen.get(tp, in_flight[tp])
        room = share - before
        if room < len(offsets):
            cuts[tp] = offsets[max(0, room)]
        seen[tp] = before + len(offsets)
    return cuts


def new_scheduler(ordering: str) -> Scheduler:
    """The scheduler for an ``ORDERING`` value (``fifo``: the plain FIFO, for comparisons in the bench)."""
    if ordering == "unordered":
        return FairFifoScheduler()
    if ordering == "partition":
        return PartitionScheduler()
    if ordering == "key":
        return KeyScheduler()
    if ordering == "fifo":
        return FifoScheduler()
    raise ValueError(f"ORDERING must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
