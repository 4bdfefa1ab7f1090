"""Per-partition commit watermarks: commit only the contiguous prefix of completed offsets.

Handlers finish out of order; committing the highest finished offset would skip messages still
running. The tracker remembers the offsets handed out per partition (in fetch order) and advances a
partition's watermark only past offsets that are all done. Used only by the poll thread: no locks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

Partition = tuple[str, int]


class PartitionState:
    """One assignment of one partition; completions carry it, so a stale one is recognised."""

    __slots__ = ("tp", "alive", "pending", "done", "abandoned", "position", "committed")

    def __init__(self, tp: Partition) -> None:
        self.tp = tp
        self.alive = True  # False once revoked: its completions are late and dropped
        self.pending: deque[int] = deque()  # offsets handed out and not yet below the watermark
        self.done: set[int] = set()  # completed offsets above the watermark
        self.abandoned: set[int] = set()  # dropped before they ran: the watermark stops at them
        self.position: int | None = None  # next offset to commit (last contiguous completed + 1)
        self.committed: int | None = None  # position last handed to commit()


class OffsetTracker:
    """Tracks in-flight offsets and the committable watermark of each assigned partition."""

    def __init__(self) -> None:
        self._parts: dict[Partition, PartitionState] = {}

    def assign(self, partitions: Iterable[Partition]) -> None:
        """Start tracking partitions (a re-assigned partition starts clean)."""
        for tp in partitions:
            old = self._parts.get(tp)
            if old is not None:
                old.alive = False
            self._parts[tp] = PartitionState(tp)

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """Forget partitions; completions that arrive for them later are ignored."""
        for tp in partitions:
            state = self._parts.pop(tp, None)
            if state is not None:
                state.alive = False

    def __contains__(self, tp: object) -> bool:
        return tp in self._parts

    def state(self, tp: Partition) -> PartitionState:
        return self._parts[tp]

    def partitions(self) -> list[Partition]:
        return list(self._parts)

    def get(self, tp: Partition) -> PartitionState | None:
        """The current assignment of ``tp``, or None when it is not ours."""
        return self._parts.get(tp)

    def add(self, tp: Partition, offset: int) -> PartitionState | None:
        """Record a fetched offset; None when the partition is not ours or the offset is already handled.

        The returned state goes with the message and comes back to :meth:`complete`.
        """
        state = self._parts.get(tp)
        if state is None or not self.admit(state, offset):
            return None
        return state

    @staticmethod
    def admit(state: PartitionState, offset: int) -> bool:
        """Record a fetched offset of a partition we own; False for a redelivery already handled."""
        pending = state.pending
        if pending:
            if offset <= pending[-1]:
                return False  # a redelivery of an offset already in flight
        elif state.position is not None and offset < state.position:
            return False  # a redelivery of an offset already completed
        pending.append(offset)
        return True

    @classmethod
    def admit_run(cls, state: PartitionState, offsets: list[int]) -> list[bool] | None:
        """Record a run of fetched offsets of one partition, as one step when it can.

        None means every offset was admitted: the run is contiguous and ascending (as one fetch
        returns it) and starts past everything already handed out or completed. Otherwise each
        offset goes through :meth:`admit` and the answer says which ones were admitted.
        Measured (bench/noop_path.py): one step per run instead of one call per message.
        """
        first, last = offsets[0], offsets[-1]
        pending = state.pending
        floor = pending[-1] if pending else (state.position - 1 if state.position is not None else first - 1)
        if first > floor and last - first == len(offsets) - 1 and offsets == list(range(first, last + 1)):
            pending.extend(offsets)
            return None
        return [cls.admit(state, offset) for offset in offsets]

    @staticmethod
    def complete(state: PartitionState, offset: int) -> bool:
        """Mark an offset done; False when its assignment was revoked since (a late completion)."""
        if not state.alive:
            return False
        pending = state.pending
        if not pending or offset < pending[0]:
            return True  # already below the watermark (a duplicate completion)
        if offset != pending[0]:
            state.done.add(offset)
            return True
        pending.popleft()
        done = state.done
        if done:
            while pending and pending[0] in done:
                offset = pending.popleft()
                done.discard(offset)
        state.position = offset + 1
        return True

    @staticmethod
    def abandon(state: PartitionState, offset: int) -> None:
        """An offset that will never run (dropped at revoke or shutdown): stop waiting for it.

        It stays pending, so the watermark can never pass it and the next owner reads it again.
        """
        state.abandoned.add(offset)

    def outstanding(self, tp: Partition) -> list[int]:
        """Offsets handed out for ``tp`` that are still to complete (running or waiting to run)."""
        state = self._parts.get(tp)
        if state is None:
            return []
        return [o for o in state.pending if o not in state.done and o not in state.abandoned]

    def in_flight(self) -> int:
        """Offsets handed out and still to complete, over all partitions."""
        return sum(len(s.pending) - len(s.done) - len(s.abandoned) for s in self._parts.values())

    def position(self, tp: Partition) -> int | None:
        """The offset a commit would store for ``tp`` (None before its first completion)."""
        state = self._parts.get(tp)
        return None if state is None else state.position

    def lag_base(self, tp: Partition) -> int | None:
        """Where lag counts from: the last committed position, else the oldest offset still in flight."""
        state = self._parts.get(tp)
        if state is None:
            return None
        if state.committed is not None and state.committed >= 0:
            return state.committed
        return state.pending[0] if state.pending else None

    def uncommitted(self, partitions: Iterable[Partition] | None = None) -> Iterator[tuple[Partition, int]]:
        """Partitions whose watermark moved since the last :meth:`mark_committed`."""
        for tp in self._parts if partitions is None else partitions:
            state = self._parts.get(tp)
            if state is not None and state.position is not None and state.position != state.committed:
                yield tp, state.position

    def mark_committed(self, tp: Partition, position: int) -> None:
        state = self._parts.get(tp)
        if state is not None:
            state.committed = position
