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
from itertools import repeat
from operator import itemgetter
from typing import Any

from mtc75.core.scheduler import CountedScheduler, FifoScheduler, Scheduler, size_of
from mtc75.core.work import Work

ORDERINGS = ("unordered", "partition", "key")

# Fair intake (mtc75/kafka/fairness.py): a partition may hold at least this many seconds of work in the
# backlog before its fetched runs are cut for a partition that waits. Demo shape (4 threads, 0.1 s,
# 3 partitions, 600 messages): the last partition waited 9.9 s between two messages without a cut,
# 1.x s with it (tests/test_ordering_e2e.py); at no-op rates the share exceeds any backlog: never cut.
FAIR_SECONDS = 0.5

# Ordered: an idle lane (a key with nothing waiting or running) is kept for the key's next message while the
# scheduler holds at most this many lanes; past it, it is dropped at once. A lane, its list and its key cost about
# 0.25 kB: 4 MB at most; with up to this many keys no lane is made or dropped per message (BENCHMARKS.md, ordering).
LANES_KEPT = 16384
# A lane's queue is a list up to this many waiting messages, then a deque (see _Lane.queue).
LONG_LANE = 64

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
        # Fresh pairs, or Works taken before. A list while short: an empty deque is 760 bytes, a list 56, and
        # with 10,000 keys the lanes' memory is what every take walks through (BENCHMARKS.md, "Where the time
        # goes"); a deque once longer than LONG_LANE (a hot key), so that taking its head stays O(1).
        self.queue: list[Any] | deque[Any] = []
        self.busy = False  # its last taken message is running, or waiting for a retry
        self.ready = False  # in part.ready


# A fetched message waiting in its lane, as (message, offset): a Work is made when it is taken (alone, or with
# others as one run), so that the poll thread's per-message cost is a tuple, not a Work and its slots.
Fresh = tuple[Any, int]


class LaneScheduler(CountedScheduler):
    """Lanes with one Work in flight each, served round-robin across partitions and lanes.

    A take hands out the lane's next message, or -- with ``take_cap`` > 1, which the dispatcher sets for a
    fast handler -- a *run*: up to ``take_cap`` fetched messages of one partition, the lane's waiting ones
    and then those of the partition's next ready lanes, as one Work in offset order. A run holds every lane
    it took from until it is released: one take and one release per run instead of per message is what keeps
    key mode near unordered with a no-op handler. A run stops at its first failure (the invoker's
    ``ordered``); the dispatcher then puts the messages after it back and hands the failed message's lane
    over to it (:meth:`handover`), the other lanes going free. A message that was taken before (a retry, or
    one that waited for rate tokens) always runs alone.
    """

    takes_chunks = False  # put() may get a fetched run of several keys; a run forms again when taken

    def __init__(self) -> None:
        self._parts: dict[object, _Part] = {}  # PartitionState -> _Part (identity: a new assignment is new)
        self._lanes: dict[Hashable, _Lane] = {}
        self._ring: deque[_Part] = deque()  # partitions with a ready lane, next to serve first
        self._busy: dict[Work, list[_Lane]] = {}  # taken and not released -> its lanes (a run may hold several)
        self.take_cap = 1  # most messages one take hands out (the dispatcher's; 1: one message per take)
        self._idle = 0  # lanes kept with nothing waiting or running (see LANES_KEPT)
        super().__init__()

    def _key_of(self, message: Any, state: object, offset: int) -> Hashable:
        raise NotImplementedError

    def _key(self, work: Work) -> Hashable:
        return self._key_of(work.message, work.state, work.offset)

    # -- interface ------------------------------------------------------------------------------------

    def _keys_of(self, work: Work) -> Iterable[Hashable]:
        """The lane key of each of ``work``'s messages, in order: one call per Work, not per message."""
        raise NotImplementedError

    def put(self, items: Iterable[Work]) -> None:
        # The poll thread's per-message path, with the dispatcher's lock held: lookups bound once, keys made
        # per Work, the new-ready step inlined, and a message waits as a tuple (see Fresh).
        lanes = self._lanes
        keys_of = self._keys_of
        ring = self._ring
        count = ready = idle = 0
        for work in items:
            state = work.state
            count += work.size
            before = work.size == 1 and (work.attempts or work.paid)  # taken before: it waits as itself
            for message, offset, key in zip(work.messages, work.offsets, keys_of(work), strict=True):
                lane = lanes.get(key)
                if lane is None:
                    lane = self._new_lane(key, state)
                queue = lane.queue
                queue.append(work if before else (message, offset))
                if lane.busy or lane.ready:  # behind a message of its key: the lane may grow long
                    if type(queue) is list and len(queue) > LONG_LANE:
                        lane.queue = deque(queue)
                else:  # it was idle (or new)
                    lane.ready = True
                    ready += 1
                    idle += 1
                    part = lane.part
                    part.ready.append(lane)
                    if not part.in_ring:
                        part.in_ring = True
                        ring.append(part)
        self._waiting += count
        self._ready += ready
        self._idle -= idle

    def requeue(self, items: list[Work]) -> None:
        for work in reversed(items):
            lanes = self._busy.pop(work, None)
            if lanes is not None and len(lanes) > 1:  # a run of several lanes (throttled): each message home
                self._requeue_run(work, lanes)
                continue
            if lanes is None:  # not known as taken (a piece of a run): as if fetched first
                lane = self._lane(work)
                if not lane.busy and not lane.ready:
                    self._idle -= 1
            else:
                lane = lanes[0]
                lane.busy = False
            lane.queue.insert(0, work)
            self._waiting += work.size
            if not lane.busy and not lane.ready:
                self._make_ready(lane, front=True)

    def _requeue_run(self, run: Work, lanes: list[_Lane]) -> None:
        """A run taken from several lanes goes back as single messages, each in front of its own lane."""
        for piece in reversed(run.split(1)):
            piece.paid, piece.attempts = run.paid, run.attempts
            self._lane(piece).queue.insert(0, piece)  # its lane: one of ``lanes``, busy until freed below
        self._waiting += run.size
        for lane in lanes:
            self._free(lane)

    def take(self) -> Work:
        ring = self._ring
        if not ring:
            raise IndexError("nothing may start now")
        part = ring.popleft()
        lane = part.ready.popleft()
        lane.ready = False
        lane.busy = True
        queue = lane.queue
        entry = queue.pop(0) if type(queue) is list else queue.popleft()  # a list is short (LONG_LANE)
        if type(entry) is not tuple:  # taken before: alone
            work, lanes = entry, [lane]
        elif self.take_cap > 1 and (lane.queue or part.ready):
            work, lanes = self._run(part, lane, entry, self.take_cap)
        else:
            work, lanes = Work(entry[0], part.state, entry[1]), [lane]
        if part.ready:
            ring.append(part)  # served: to the back, behind every other partition with work
        else:
            part.in_ring = False
        self._busy[work] = lanes
        self._waiting -= work.size
        self._ready -= len(lanes)
        return work

    def _run(self, part: _Part, lane: _Lane, first: Fresh, cap: int) -> tuple[Work, list[_Lane]]:
        """``first`` (taken from ``lane``) and up to ``cap`` messages in all: the rest of the lane's fresh
        messages, then those of the partition's next ready lanes in turn, as one Work in offset order."""
        taken = [first]
        lanes = [lane]
        ready = part.ready
        room = cap - 1
        while True:
            queue = lane.queue
            if not queue or not room:
                pass
            elif type(queue) is list:  # the lane's fresh messages up to the room, as one slice
                end = min(len(queue), room)
                count = 0
                while count < end and type(queue[count]) is tuple:
                    count += 1
                if count:
                    taken += queue[:count]
                    del queue[:count]
                    room -= count
            else:  # a long lane (a deque)
                while queue and room and type(queue[0]) is tuple:
                    taken.append(queue.popleft())
                    room -= 1
            if not room or not ready or type(ready[0].queue[0]) is not tuple:
                break
            lane = ready.popleft()
            lane.ready = False
            lane.busy = True
            lanes.append(lane)
            queue = lane.queue
            taken.append(queue.pop(0) if type(queue) is list else queue.popleft())
            room -= 1
        if len(lanes) > 1:
            taken.sort(key=_offset_of)  # several keys: the order across them is free, the ledger's is by offset
        messages, offsets = zip(*taken, strict=True)
        return Work.of(messages, offsets, part.state), lanes

    def release(self, work: Work) -> None:
        lanes = self._busy.pop(work, None)
        if lanes is None:
            return  # released twice, or never taken here: nothing it blocks
        if len(lanes) == 1:
            self._free(lanes[0])
            return
        # A run's lanes (one each, with many keys): _free inlined for the lanes left with nothing waiting
        kept = len(self._lanes) <= LANES_KEPT
        idle = 0
        for lane in lanes:
            if lane.queue or not kept:
                self._free(lane)
            else:
                lane.busy = False
                idle += 1
        self._idle += idle

    def _free(self, lane: _Lane) -> None:
        lane.busy = False
        if lane.queue:
            self._make_ready(lane, front=False)  # its next message, behind the lanes that waited meanwhile
            return
        if len(self._lanes) > LANES_KEPT:
            self._forget(lane)  # a key space larger than what is kept: made again for the key's next message
        else:
            self._idle += 1  # kept for the key's next message

    def handover(self, work: Work, piece: Work) -> None:
        """The taken run ``work`` stopped at ``piece``, which failed: its lane stays busy, held by ``piece``
        from now on (through its retries or its last report); the run's other lanes are free. The caller
        has settled the run's other messages or put them back in their lanes."""
        lanes = self._busy.pop(work, None)
        if lanes is None:
            return
        held = self._lanes.get(self._key(piece))
        for lane in lanes:
            if lane is held:
                self._busy[piece] = [lane]
            else:
                self._free(lane)

    def purge(self, drop: Callable[[Work], bool] | None = None) -> list[Work]:
        """Remove waiting messages; a lane whose message runs stays busy until that message's ``release``."""
        dropped: list[Work] = []
        for lane in list(self._lanes.values()):
            if lane.queue:
                state = lane.part.state
                kept: list[Any] = []
                for entry in lane.queue:
                    work = Work(entry[0], state, entry[1]) if type(entry) is tuple else entry  # type: ignore[arg-type]
                    if drop is None or drop(work):
                        dropped.append(work)
                    else:
                        kept.append(entry)
                lane.queue = kept
        self._sweep()
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
        self._waiting -= sum(map(size_of, dropped))
        return dropped

    def behind(self, work: Work) -> int:
        lanes = self._busy.get(work)
        return 0 if lanes is None else sum(len(lane.queue) for lane in lanes)

    @property
    def running(self) -> int:
        """Works (messages or runs) taken and not yet released (running, or waiting for a retry)."""
        return len(self._busy)

    @property
    def lanes(self) -> int:
        """Keys (or partitions) with a message waiting or running (idle lanes kept for reuse left out)."""
        return len(self._lanes) - self._idle

    @property
    def kept(self) -> int:
        """Lanes held in memory: those of :attr:`lanes`, and idle ones kept for reuse (at most LANES_KEPT)."""
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
        self._idle += 1  # until its first message: the caller makes it ready
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

    def _sweep(self) -> None:
        """Drop every idle lane (10,000 keys seen once cost nothing after)."""
        for lane in [lane for lane in self._lanes.values() if not lane.busy and not lane.queue]:
            self._forget(lane)
        self._idle = 0

    def _forget(self, lane: _Lane) -> None:
        """The lane has nothing waiting or running: drop it."""
        if self._lanes.pop(lane.key, None) is None:
            return
        part = lane.part
        part.lanes -= 1
        if part.lanes == 0 and self._parts.get(part.state) is part:
            del self._parts[part.state]


_offset_of = itemgetter(1)


class PartitionScheduler(LaneScheduler):
    """``ORDERING=partition``: at most one Work of a partition assignment in flight, in offset order."""

    def _key_of(self, message: Any, state: object, offset: int) -> Hashable:
        return state

    def _keys_of(self, work: Work) -> Iterable[Hashable]:
        return repeat(work.state, work.size)


class KeyScheduler(LaneScheduler):
    """``ORDERING=key``: one Work per (partition, key) in flight, in offset order; keyless messages free.

    The lane is per partition assignment and key: Kafka orders a key only within its partition, and a
    re-assigned partition starts clean. A message whose ``key()`` is None gets a lane of its own (keyed by
    its offset), so it runs as soon as a thread is free, like in unordered mode.
    """

    def _key_of(self, message: Any, state: object, offset: int) -> Hashable:
        key = message.key()
        return (state, key if key is not None else offset)

    def _keys_of(self, work: Work) -> Iterable[Hashable]:
        state = work.state
        return [(state, key if key is not None else offset)
                for key, offset in zip([m.key() for m in work.messages], work.offsets, strict=True)]


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
