"""Per-partition commit watermarks: commit only the contiguous prefix of completed offsets.

Thread contract: poll thread only, no locks -- with two exceptions that workers read: ``alive`` (a single
bool only the poll thread writes: False at revoke or re-assignment, never back to True; a stale True costs
one needless retry whose completion is then dropped as late) and ``closing`` (written and read only under
the dispatcher's lock: :meth:`mtc75.runtime.dispatcher.Dispatcher.retire`). No other field may be read off
the poll thread.

Handlers finish out of order; committing the highest finished offset would skip messages still
running. The tracker remembers the offsets handed out per partition (in fetch order) and advances a
partition's watermark only past offsets that are all done. The finished offsets above the watermark
(``done``) go with each commit as an offset map (:mod:`mtc75.core.offsetmap`); a map read back at
assignment makes its offsets complete at once when fetched again, without a handler
(:meth:`OffsetTracker.skip_finished`). What was committed is the checkpoint's business
(:mod:`mtc75.engine.checkpoint`), not the tracker's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping

from mtc75.core.offsetmap import FinishedOffsets

Partition = tuple[str, int]


class Pending:
    """A partition's offsets handed out and not yet below the watermark, ascending, kept as runs of
    consecutive offsets: a fetched run goes in as one step and a chunk that completes at the head goes out
    as one, whatever its length. Reads as the sequence of its offsets (``len``, iteration, ``[0]``, ``[-1]``).
    """

    __slots__ = ("_runs", "_count")

    def __init__(self) -> None:
        self._runs: deque[list[int]] = deque()  # [first, stop) of each run, ascending, with gaps between
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[int]:
        for first, stop in list(self._runs):
            yield from range(first, stop)

    def __getitem__(self, index: int) -> int:
        runs = self._runs
        if not runs:
            raise IndexError("no offset pending")
        if index == 0:
            return runs[0][0]
        if index == -1:
            return runs[-1][1] - 1
        return list(self)[index]

    def __repr__(self) -> str:
        return f"Pending({[tuple(run) for run in self._runs]})"

    def add(self, first: int, count: int = 1) -> None:
        """Append ``first .. first + count - 1``, all past the last offset pending (the caller checks)."""
        runs = self._runs
        if runs and runs[-1][1] == first:
            runs[-1][1] += count
        else:
            runs.append([first, first + count])
        self._count += count

    def popleft(self) -> int:
        """Remove and return the first offset (IndexError when none is pending)."""
        head = self._runs[0]
        offset = head[0]
        head[0] = offset + 1
        if head[0] == head[1]:
            self._runs.popleft()
        self._count -= 1
        return offset

    def pop_head(self, first: int, count: int) -> bool:
        """Remove ``first .. first + count - 1`` when they are the oldest offsets pending, in one step."""
        runs = self._runs
        if not runs:
            return False
        head = runs[0]
        stop = first + count
        if head[0] != first or stop > head[1]:
            return False
        if stop == head[1]:
            runs.popleft()
        else:
            head[0] = stop
        self._count -= count
        return True

    def pop_done(self, done: set[int]) -> int | None:
        """Remove the oldest offsets while they are in ``done`` (and from it); the last one removed, or None."""
        runs = self._runs
        last = None
        while runs:
            head = runs[0]
            offset, stop = head
            if offset not in done:
                break
            end = offset + 1
            while end < stop and end in done:
                end += 1
            done.difference_update(range(offset, end))
            self._count -= end - offset
            last = end - 1
            if end == stop:
                runs.popleft()
            else:
                head[0] = end
                break
        return last


class PartitionState:
    """One assignment of one partition; completions carry it, so a stale one is recognised."""

    __slots__ = ("tp", "alive", "closing", "pending", "done", "abandoned", "position", "finished", "version")

    def __init__(self, tp: Partition, finished: FinishedOffsets | None = None) -> None:
        self.tp = tp
        # False once revoked: its completions are late and dropped. The one field workers read (no lock).
        self.alive = True
        # True once the assignment is being given up: nothing of it is retried or put back (under the lock)
        self.closing = False
        self.pending = Pending()  # offsets handed out and not yet below the watermark
        self.done: set[int] = set()  # completed offsets above the watermark
        self.abandoned: set[int] = set()  # dropped before they ran: the watermark stops at them
        self.position: int | None = None  # next offset to commit (last contiguous completed + 1)
        # The offset map read at assignment: offsets that finished under an earlier owner (skipped)
        self.finished = finished or None
        self.version = 0  # bumped whenever ``done`` grows: the commit's map must be re-sent


class OffsetTracker:
    """Tracks in-flight offsets and the committable watermark of each assigned partition."""

    def __init__(self) -> None:
        self._parts: dict[Partition, PartitionState] = {}

    def assign(
        self, partitions: Iterable[Partition], finished: Mapping[Partition, FinishedOffsets] | None = None
    ) -> None:
        """Start tracking partitions (a re-assigned partition starts clean).

        ``finished``: the offset maps read from the group's commits; their offsets are not run again.
        """
        finished = finished or {}
        for tp in partitions:
            old = self._parts.get(tp)
            if old is not None:
                old.alive = False
            self._parts[tp] = PartitionState(tp, finished.get(tp))

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

    @staticmethod
    def admit(state: PartitionState, offset: int) -> bool:
        """Record a fetched offset of a partition we own; False for a redelivery already handled."""
        pending = state.pending
        if pending:
            if offset <= pending[-1]:
                return False  # a redelivery of an offset already in flight
        elif state.position is not None and offset < state.position:
            return False  # a redelivery of an offset already completed
        pending.add(offset)
        return True

    @classmethod
    def admit_range(cls, state: PartitionState, offsets: list[int]) -> list[bool] | None:
        """Record a run of fetched offsets of one partition, as one step when it can.

        None means every offset was admitted: the run is contiguous and ascending (as one fetch
        returns it) and starts past everything already handed out or completed. Otherwise each
        offset goes through :meth:`admit` and the answer says which ones were admitted.
        """
        first, last = offsets[0], offsets[-1]
        pending = state.pending
        floor = pending[-1] if pending else (state.position - 1 if state.position is not None else first - 1)
        if first > floor and last - first == len(offsets) - 1 and offsets == list(range(first, last + 1)):
            pending.add(first, len(offsets))
            return None
        return [cls.admit(state, offset) for offset in offsets]

    @classmethod
    def skip_finished(cls, state: PartitionState, offset: int) -> bool:
        """After :meth:`admit`: True when the offset map says ``offset`` already finished.

        It is then completed at once and must not be handed to a handler. The map is dropped once
        an offset at or past its end is admitted (offsets are admitted in ascending order).
        """
        finished = state.finished
        if finished is None:
            return False
        if offset >= finished.end:
            state.finished = None
            return False
        if offset not in finished:
            return False
        cls.complete(state, offset)
        return True

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
            state.version += 1
            return True
        pending.popleft()
        if state.done:
            drained = pending.pop_done(state.done)
            if drained is not None:
                offset = drained
        state.position = offset + 1
        return True

    @classmethod
    def complete_range(cls, state: PartitionState, first: int, count: int) -> bool:
        """Mark ``first .. first + count - 1`` done, as one step each way it can.

        A chunk is admitted as consecutive offsets (:meth:`admit_range`): when it is the oldest in flight it
        leaves ``pending`` in one step (then whatever finished above it follows); when all of it is above the
        oldest it joins ``done`` in one step. Anything else goes offset by offset through :meth:`complete`.
        """
        if not state.alive:
            return False
        pending = state.pending
        if pending.pop_head(first, count):
            last = first + count - 1
            if state.done:
                drained = pending.pop_done(state.done)
                if drained is not None:
                    last = drained
            state.position = last + 1
            return True
        if pending and first > pending[0]:
            state.done.update(range(first, first + count))
            state.version += 1
            return True
        for offset in range(first, first + count):
            cls.complete(state, offset)
        return True

    @staticmethod
    def step_over(state: PartitionState, position: int | None) -> bool:
        """Nothing of the partition is in flight and the client's position is past everything handed out: the
        offsets between were records no handler gets (transaction markers, aborted transactions), so the commit
        position moves to ``position``. True when it moved.

        ``position`` must be the position after the last record the client returned, all of which were
        handed out (admitted) or sought back: never one the engine dropped unhandled.
        """
        if state.pending or position is None or position <= (state.position if state.position is not None else -1):
            return False
        state.position = position
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

    @staticmethod
    def watermark(state: PartitionState) -> int | None:
        """The offset a commit stores: the first unfinished one.

        Before the first contiguous completion that is the oldest offset in flight, committed only
        when something above it finished (so its offset map has something to say).
        """
        if state.position is not None:
            return state.position
        if state.done and state.pending:
            return state.pending[0]
        return None

    @staticmethod
    def span(state: PartitionState) -> tuple[int, int]:
        """``(first unfinished offset, next offset)``: what :class:`mtc75.core.offsetmap.WindowPolicy` bounds."""
        pending = state.pending
        if not pending:
            pos = state.position if state.position is not None else 0
            return pos, pos
        low = state.position if state.position is not None else pending[0]
        return low, pending[-1] + 1
