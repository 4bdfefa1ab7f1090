"""When a bounded run ends: ``max_messages`` handled, or ``idle_exit`` seconds idle (pure: callers pass ``now``).

``max_messages`` bounds admission too (:meth:`RunBounds.budget`): messages finished and in flight count, so a
run handles exactly that many and the rest is read next time. Once all N are admitted, a run whose handlers
finish nothing for ``grace`` seconds (SHUTDOWN_TIMEOUT) ends too, unless retries wait out a backoff: a hung
handler among the N must not keep it going (shutdown then bounds the wait and abandons it).

Idle counts from the first assignment (waiting for the group is not idleness) and means nothing to fetch *and*
nothing held or waiting: time with every broker down, with a partition held by OFFSET_WINDOW, or from a lost
assignment (membership expired) to the group's next one, is not idle and the clock starts again when it ends; so
does a new message. With handlers still running, the run ends once none finished for as long (a hung handler
must not keep it going: shutdown bounds the wait), unless retries wait out a backoff (they will finish).

Thread contract: the poll thread only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """What the bounds look at, read by the engine each loop turn."""

    processed: int  # messages finished
    in_flight: int  # admitted and not finished
    delayed: int  # retries waiting out a backoff
    admitted_at: float  # when a message was last admitted
    finished_at: float  # when a message last finished
    blind: bool  # every broker down, a partition held by OFFSET_WINDOW, or rejoining after a lost assignment:
    # messages may wait where we cannot see


class RunBounds:
    """``max_messages`` and ``idle_exit`` of one run (None: no such bound)."""

    def __init__(self, max_messages: int | None, idle_exit: float | None, grace: float = 30.0) -> None:
        self.max_messages = max_messages
        self.idle_exit = idle_exit
        self.grace = grace  # with all max_messages admitted: seconds without a finish that end the run
        self.assigned_at: float | None = None  # the first assignment
        self._idle_from = 0.0  # a blind spell restarts the idle clock here

    def assigned(self, now: float) -> None:
        if self.assigned_at is None:
            self.assigned_at = now

    def budget(self, processed: int, in_flight: int) -> int | None:
        """Messages that may still be admitted (None: any number)."""
        if self.max_messages is None:
            return None
        return max(0, self.max_messages - processed - in_flight)

    def ended(self, now: float, progress: Progress) -> str | None:
        """Why the run ends now (a line for the log), or None."""
        if self.max_messages is not None:
            if progress.processed >= self.max_messages:
                return f"handled {progress.processed} messages (max_messages reached)"
            if (progress.processed + progress.in_flight >= self.max_messages and progress.delayed == 0
                    and now - max(progress.admitted_at, progress.finished_at) >= self.grace):
                return (f"handled {progress.processed} of max_messages {self.max_messages}; the other "
                        f"{progress.in_flight} finished nothing for {self.grace:.1f}s")
        idle, since = self.idle_exit, self.assigned_at
        if idle is None or since is None:
            return None
        if progress.blind:  # not idle; the clock starts again when the spell ends, from the last turn it lasted
            self._idle_from = now
            return None
        start = max(progress.admitted_at, since, self._idle_from)
        if now - start < idle:
            return None
        if progress.in_flight == 0 or (progress.delayed == 0 and now - max(progress.finished_at, start) >= idle):
            return f"no new message for {idle:.1f}s (idle_exit)"
        return None
