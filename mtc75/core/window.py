"""Which partitions the bounded window holds: a partition whose span reached OFFSET_WINDOW is paused alone.

Pure: no Kafka, no clock. Used by the poll thread only (no locks).

Behind a stuck message the finished-but-uncommitted offsets of its partition pile up; the offset map
(:mod:`mtc75.core.offsetmap`) must cover them and the tracker keeps them in memory. So once a partition's
span (next offset - first unfinished offset) reaches the bound, that partition alone stops taking
messages until :class:`mtc75.core.offsetmap.WindowPolicy` releases it; the other partitions go on.

The hold is separate from the pause gate's pause-all: :meth:`WindowHolds.update` is told which
partitions the gate paused, so it never resumes one of those (the gate resumes them) and the engine's
gate resume leaves held ones paused (:meth:`WindowHolds.__contains__`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from mtc75.core.offsetmap import WindowPolicy
from mtc75.core.offsets import OffsetTracker, Partition


class WindowHolds:
    """The partitions held by the window, and what to pause or resume as spans change."""

    def __init__(self, bound: int) -> None:
        self._policy = WindowPolicy(bound)
        self._held: set[Partition] = set()
        self.holds = 0  # how many times a partition was held (for logs and tests)

    @property
    def bound(self) -> int:
        return self._policy.bound

    def __contains__(self, tp: object) -> bool:
        return tp in self._held

    def __len__(self) -> int:
        return len(self._held)

    def update(
        self, tracker: OffsetTracker, gate_paused: Collection[Partition],
        admitted: Iterable[Partition] | None = None,
    ) -> tuple[list[Partition], list[Partition]]:
        """``(to_pause, to_resume)``: the consumer calls that make the holds true now.

        A partition the gate paused is never in ``to_pause`` (already paused) nor ``to_resume``
        (the gate resumes it). A held partition that is no longer ours is forgotten (the revoke resumed it).
        ``admitted``: the partitions that took new offsets since the last update (None: all of them).
        A span only grows when offsets are admitted (its low end only moves up), so only those can
        reach the bound; the engine passes them and skips a scan of every partition on every loop
        turn (~1 us a partition: 0.1 ms a turn at 100 partitions, where a no-op turn of 500 messages
        takes about 1.5 ms).
        """
        policy = self._policy
        to_pause: list[Partition] = []
        to_resume: list[Partition] = []
        for tp in list(self._held):
            state = tracker.get(tp)
            if state is None:
                self._held.discard(tp)
            elif not policy.hold(True, *tracker.span(state)):
                self._held.discard(tp)
                if tp not in gate_paused:
                    to_resume.append(tp)
        for tp in tracker.partitions() if admitted is None else admitted:
            if tp in self._held:
                continue
            state = tracker.get(tp)
            if state is not None and policy.hold(False, *tracker.span(state)):
                self._held.add(tp)
                self.holds += 1
                if tp not in gate_paused:
                    to_pause.append(tp)
        return to_pause, to_resume

    def forget(self, tps: Iterable[Partition]) -> list[Partition]:
        """Partitions given up (revoke, lost, re-assigned): returns those that were held, to resume."""
        held = [tp for tp in tps if tp in self._held]
        self._held.difference_update(held)
        return held
