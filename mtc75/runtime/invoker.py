"""The one handler path: the only place that calls the user's handler, and the only one that knows its kind.

A handler is *sync* (a plain function: called on a worker thread) or *async* (``async def``, an object whose
``__call__`` is one, a ``functools.partial`` of either: awaited on the event loop). :class:`Invoker` turns one
``Work`` -- a single message, or a chunk of consecutive messages for a fast sync handler -- into its
``Outcome``: None when every call returned, the error of a single message, or a :class:`Partial` saying which
messages of a chunk raised and how many ran. Every failure counts, ``BaseException`` included, and so does a
plain function that *returns* an awaitable (nothing awaits it, so its work never ran).

What a handler returns is read here alone: None is the fast path (nothing else is looked at); output
records (:mod:`mtc75.core.output`) go onto the Work as ``(offset, Output)`` pairs, which the worker owns
while it runs it; a malformed one is the message's failure; any other value is ignored, with one warning
per type.

Timing is observed, never wrapped around the handler: every ``Work`` reports its handler time and message
count to the :class:`WorkObserver` (the dispatcher's chunk sizing), and while a :class:`CallObserver` is
attached (metrics, ``MAX_THREAD_COUNT="auto"``) each call's duration goes to it, with the call's thread CPU
time measured after every slow call and one short call in ``CPU_SAMPLE_EVERY`` when an observer asks for it.

A chunk still going after ``CHUNK_SECONDS`` is cut after the current call: chunks are sized for about a
millisecond of handler time, so one that lasts twenty holds a handler that turned slow, and its other
messages must be free for the other workers.

Threads: built, and observers attached or detached, on the poll thread (attaching swaps one function
reference that workers read once per Work); :meth:`Invoker.invoke` runs on worker threads,
:meth:`Invoker.invoke_async` on the event-loop thread. Observers are called on the thread that made the call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol

from mtc75.core.output import Output, ignored_type, outputs_of
from mtc75.core.work import Work
from mtc75.runtime.handlers import Handler, handler_name, is_async_handler, prepare_handler, result_error

logger = logging.getLogger(__name__)

# Four of the interpreter's 5 ms GIL switch intervals: a handler that turned slow, not a worker that waited
# its turn for the GIL (chunks are sized for ~1 ms, mtc75/runtime/dispatcher.py CHUNK_TARGET).
CHUNK_SECONDS = 0.02
# A thread CPU clock read costs about a microsecond: every call after one this slow measures its CPU,
# shorter calls one in CPU_SAMPLE_EVERY (a power of two: the check is a mask).
SLOW_CALL = 1e-4
CPU_SAMPLE_EVERY = 16


class Partial(NamedTuple):
    """A chunk that did not simply succeed: the handler saw its first ``handled`` messages, and
    ``failures`` holds ``(index, error)`` for each of them that raised."""

    handled: int
    failures: list[tuple[int, BaseException]]


# What a Work came to: None (done), the error of a single message, or a Partial (a chunk).
Outcome = BaseException | Partial | None
# What one call came to: None (done), its error, or the output records it returned (done, to be written).
CallResult = BaseException | list[Output] | None


class CallObserver(Protocol):
    """Told of every handler call, on the thread that made it; must be cheap and must not raise."""

    wants_cpu: bool  # also wants the call's thread CPU time (sampled; never for coroutines)

    def call_ended(self, seconds: float, cpu: float | None) -> None:
        """One call took ``seconds`` of wall time (and ``cpu`` thread CPU seconds, when measured)."""


class WorkObserver(Protocol):
    """Told of every Work's handler time, on the thread that ran it."""

    def work_ended(self, seconds: float, messages: int) -> None:
        """``messages`` handler calls took ``seconds`` in all."""


class _CallClock:
    """One thread's call count and whether its last call was slow (the CPU sampling rule)."""

    __slots__ = ("count", "slow")

    def __init__(self) -> None:
        self.count = 0
        self.slow = True


class Invoker:
    """Calls ``handler`` for a Work and reports its outcome and its time (see the module notes)."""

    def __init__(
        self, handler: Handler, *, name: str | None = None,
        clock: Callable[[], float] = time.perf_counter, cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.handler = prepare_handler(handler, name)  # refuses what no runner can run
        self.is_async = is_async_handler(self.handler)  # awaited on the event loop, single messages only
        self.name = name or handler_name(self.handler)
        self._clock, self._cpu_clock = clock, cpu_clock  # wall and this thread's CPU seconds (tests: fakes)
        self._calls: list[CallObserver] = []
        self._work: WorkObserver | None = None
        self._local = threading.local()
        self._ignored: set[str] = set()  # types of return values ignored and warned about (once each)
        self._call: Callable[[Any], CallResult] = self._plain_call()
        self._acall: Callable[[Any], Awaitable[CallResult]] = self._plain_acall()

    # -- observers (poll thread) -----------------------------------------------------------------------

    def attach(self, observer: CallObserver) -> None:
        """Time every call for ``observer`` from the next Work on (idempotent)."""
        if observer not in self._calls:
            self._calls = [*self._calls, observer]
            self._rebuild()

    def detach(self, observer: CallObserver) -> None:
        if observer in self._calls:
            self._calls = [o for o in self._calls if o is not observer]
            self._rebuild()

    def report_work_to(self, observer: WorkObserver | None) -> None:
        self._work = observer

    @property
    def observers(self) -> tuple[CallObserver, ...]:
        return tuple(self._calls)

    def _rebuild(self) -> None:
        if self._calls:
            self._call, self._acall = self._timed_call(), self._timed_acall()
        else:
            self._call, self._acall = self._plain_call(), self._plain_acall()

    # -- calls (worker threads / the event loop) -------------------------------------------------------

    def invoke(self, work: Work) -> Outcome:
        """Run a Work of a sync handler on this thread: one call per message, in offset order."""
        clock = self._clock
        started = clock()
        if work.size == 1:
            result = self._call(work.message)
            if result is not None and type(result) is list:
                work.outputs = [(work.offset, output) for output in result]
                result = None
            outcome: Outcome = result
            handled = 1
        else:
            outcome = self._chunk(work, started + CHUNK_SECONDS)
            handled = work.size if outcome is None else outcome.handled
        observer = self._work
        if observer is not None:
            observer.work_ended(clock() - started, handled)
        return outcome

    async def invoke_async(self, work: Work) -> Outcome:
        """Await an async handler for a Work's one message (on the event loop)."""
        clock = self._clock
        started = clock()
        result = await self._acall(work.message)
        if result is not None and type(result) is list:
            work.outputs = [(work.offset, output) for output in result]
            result = None
        outcome: Outcome = result
        observer = self._work
        if observer is not None:
            observer.work_ended(clock() - started, 1)
        return outcome

    def _chunk(self, work: Work, deadline: float) -> Partial | None:
        """One call per message; stops early (handing the rest back) once ``deadline`` passed."""
        call = self._call
        clock = self._clock
        messages: Sequence[Any] = work.messages
        failures: list[tuple[int, BaseException]] | None = None
        handled = 0
        last = len(messages)
        for message in messages:
            error = call(message)
            if error is not None:
                if type(error) is list:  # output records: done
                    if work.outputs is None:
                        work.outputs = []
                    offset = work.offset + handled
                    work.outputs.extend((offset, output) for output in error)
                else:
                    if failures is None:
                        failures = []
                    failures.append((handled, error))
            handled += 1
            if handled < last and clock() >= deadline:
                return Partial(handled, failures or [])
        return None if failures is None else Partial(handled, failures)

    def _returned(self, result: object) -> CallResult:
        """A handler's non-None return value: an awaitable (a failure), outputs, or ignored (see the module
        notes). Off the fast path: a None return never gets here."""
        refused = result_error(result)
        if refused is not None:
            return refused
        outputs = outputs_of(result)
        if outputs is None:
            name = ignored_type(result)
            if name is not None and name not in self._ignored:  # a lost race warns twice: harmless
                self._ignored.add(name)
                logger.warning("handler %s returned a %s: ignored (only None, an mtc75.Output or a list, tuple or "
                               "generator of them mean something)", self.name, name)
            return None
        if isinstance(outputs, BaseException):
            return outputs
        return list(outputs) or None

    def _plain_call(self) -> Callable[[Any], CallResult]:
        handler, returned = self.handler, self._returned

        def call(message: Any) -> CallResult:
            try:
                result = handler(message)
            except BaseException as err:
                # Any failure -- SystemExit, KeyboardInterrupt or a CancelledError leaking from library
                # code too -- is the message's: retried, then ON_FAILURE; never the worker's end.
                return err
            return None if result is None else returned(result)

        return call

    def _timed_call(self) -> Callable[[Any], CallResult]:
        handler, observers, local, returned = self.handler, self._calls, self._local, self._returned
        wants_cpu = any(o.wants_cpu for o in observers)
        clock, cpu_clock = self._clock, self._cpu_clock
        mask = CPU_SAMPLE_EVERY - 1

        def call(message: Any) -> CallResult:
            try:
                tally = local.clock
            except AttributeError:
                tally = local.clock = _CallClock()
            on_cpu = wants_cpu and (tally.slow or not tally.count & mask)
            cpu_started = cpu_clock() if on_cpu else 0.0
            started = clock()
            error: CallResult
            try:
                result = handler(message)
                error = None if result is None else returned(result)
            except BaseException as err:  # see _plain_call
                error = err
            seconds = clock() - started
            cpu = cpu_clock() - cpu_started if on_cpu else None
            tally.slow = seconds >= SLOW_CALL
            tally.count += 1
            for observer in observers:
                observer.call_ended(seconds, cpu)
            return error

        return call

    def _plain_acall(self) -> Callable[[Any], Awaitable[CallResult]]:
        handler, returned = self.handler, self._returned

        async def call(message: Any) -> CallResult:
            try:
                result = await handler(message)  # type: ignore[misc]
            except BaseException as err:  # CancelledError too: the runner tells its own from the handler's
                return err
            return None if result is None else returned(result)

        return call

    def _timed_acall(self) -> Callable[[Any], Awaitable[CallResult]]:
        handler, observers, returned = self.handler, self._calls, self._returned
        clock = self._clock

        async def call(message: Any) -> CallResult:
            started = clock()
            error: CallResult = None
            try:
                result = await handler(message)  # type: ignore[misc]
                error = None if result is None else returned(result)
            except BaseException as err:  # see _plain_acall
                error = err
            seconds = clock() - started
            for observer in observers:  # the loop thread runs other coroutines meanwhile: no CPU share
                observer.call_ended(seconds, None)
            return error

        return call
