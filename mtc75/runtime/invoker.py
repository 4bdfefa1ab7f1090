"""The one handler path: the only place that calls the user's handler, and the only one that knows its kind.

A handler is *sync* (a plain function: called on a worker thread) or *async* (``async def``, an object whose
``__call__`` is one, a ``functools.partial`` of either: awaited on the event loop). :class:`Invoker` turns one
``Work`` -- a single message, or a chunk of consecutive messages for a fast sync handler -- into its
``Outcome``: None when every call returned, the error of a single message, or a :class:`Partial` saying which
messages of a chunk raised and how many ran. Every failure counts, ``BaseException`` included, and so does a
plain function that *returns* an awaitable (nothing awaits it, so its work never ran).

Timing is observed, never wrapped around the handler: every ``Work`` reports its handler time and message
count to the :class:`WorkObserver` (the dispatcher's chunk sizing), and while a :class:`CallObserver` is
attached (metrics, ``MAX_THREAD_COUNT="auto"``) each call's duration goes to it, with the call's thread CPU
time measured after every slow call and one short call in ``CPU_SAMPLE_EVERY`` when an observer asks for it.

A chunk still going after ``CHUNK_SECONDS`` is cut after the current call: chunks are sized for about a
millisecond of handler time, so one that lasts twenty holds a handler that turned slow, and its other
messages must be free for the other workers.

A *process* handler (``RUNNER="processes"``, a plain one: an async handler keeps the event loop) runs in
worker processes (mtc75/runtime/procpool.py): it is pickled here, once, so that what cannot cross is refused
at construction; :meth:`Invoker.invoke_in` sends a Work's messages to a worker process and turns the reply
into the same Outcome (the worker calls the handler with its own Invoker: :meth:`Invoker.run_messages`),
its handler time and per-call timings reported here as if measured here.

Threads: built, and observers attached or detached, on the poll thread (attaching swaps one function
reference that workers read once per Work); :meth:`Invoker.invoke` and :meth:`Invoker.invoke_in` run on
worker threads, :meth:`Invoker.invoke_async` on the event-loop thread, :meth:`Invoker.run_messages` on a
worker process's main thread. Observers are called on the thread that made (or, for a process handler,
sent) the call.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol

from mtc75.core.work import Work
from mtc75.errors import HandlerRefused
from mtc75.runtime.handlers import Handler, handler_name, is_async_handler, prepare_handler, result_error
from mtc75.runtime.procworker import Reply, safe_text

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


class CallObserver(Protocol):
    """Told of every handler call, on the thread that made it; must be cheap and must not raise."""

    wants_cpu: bool  # also wants the call's thread CPU time (sampled; never for coroutines)

    def call_ended(self, seconds: float, cpu: float | None) -> None:
        """One call took ``seconds`` of wall time (and ``cpu`` thread CPU seconds, when measured)."""


class WorkObserver(Protocol):
    """Told of every Work's handler time, on the thread that ran it."""

    def work_ended(self, seconds: float, messages: int) -> None:
        """``messages`` handler calls took ``seconds`` in all."""


class WorkerCalls(Protocol):
    """Where a process handler's calls go (mtc75/runtime/procpool.py ``ProcessPool``)."""

    def call(self, messages: Sequence[Any], timed: bool, tag: object, wanted: Callable[[], bool]) -> Reply:
        """Run one partition's ``messages`` in a worker process (blocking). ``tag`` names their owner;
        ``wanted()`` False while they wait for a process means: do not send them (``Reply.lost`` says so)."""


class _CallClock:
    """One thread's call count and whether its last call was slow (the CPU sampling rule)."""

    __slots__ = ("count", "slow")

    def __init__(self) -> None:
        self.count = 0
        self.slow = True


class Invoker:
    """Calls ``handler`` for a Work and reports its outcome and its time (see the module notes)."""

    def __init__(
        self, handler: Handler, *, name: str | None = None, processes: int = 0,
        clock: Callable[[], float] = time.perf_counter, cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.handler = prepare_handler(handler, name)  # refuses what no runner can run
        self.is_async = is_async_handler(self.handler)  # awaited on the event loop, single messages only
        self.name = name or handler_name(self.handler)
        # worker processes to run a plain handler in (RUNNER="processes"), 0 for threads; its pickle, made once
        self.processes = 0 if self.is_async else processes
        self.pickled = pickled_handler(self.handler, self.name) if self.processes else b""
        self._clock, self._cpu_clock = clock, cpu_clock  # wall and this thread's CPU seconds (tests: fakes)
        self._calls: list[CallObserver] = []
        self._work: WorkObserver | None = None
        self._local = threading.local()
        self._call: Callable[[Any], BaseException | None] = self._plain_call()
        self._acall: Callable[[Any], Awaitable[BaseException | None]] = self._plain_acall()

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
            outcome: Outcome = self._call(work.message)
            handled = 1
        else:
            outcome = self._chunk(work.messages, started + CHUNK_SECONDS)
            handled = work.size if outcome is None else outcome.handled
        observer = self._work
        if observer is not None:
            observer.work_ended(clock() - started, handled)
        return outcome

    def run_messages(self, messages: Sequence[Any]) -> tuple[Outcome, int, float]:
        """:meth:`invoke` without a Work, in a worker process: the outcome, how many messages the handler
        saw, and their handler seconds."""
        clock = self._clock
        started = clock()
        if len(messages) == 1:
            outcome: Outcome = self._call(messages[0])
            handled = 1
        else:
            outcome = self._chunk(messages, started + CHUNK_SECONDS)
            handled = len(messages) if outcome is None else outcome.handled
        return outcome, handled, clock() - started

    def invoke_in(self, pool: WorkerCalls, work: Work) -> Outcome:
        """Run a Work of a process handler in one of ``pool``'s worker processes (this thread waits)."""
        state = work.state
        calls = self._calls
        reply = pool.call(work.messages, bool(calls), state, lambda: state.alive and not state.closing)
        if reply.lost is not None:
            # Not run to its end: its worker process died (or was stopped) running it, or it was given up
            # before it was sent. A chunk goes back as single messages, untried (one that kills its process
            # fails alone when it runs again); a single message fails, and is retried unless given up.
            return reply.lost if work.size == 1 else Partial(0, [])
        observer = self._work
        if observer is not None:
            observer.work_ended(reply.seconds, reply.handled)
        if reply.calls:
            for seconds, cpu in reply.calls:
                for call_observer in calls:
                    call_observer.call_ended(seconds, cpu)
        failures = reply.failures
        if work.size == 1:
            return failures[0][1] if failures else None
        if failures or reply.handled < work.size:
            return Partial(reply.handled, failures)
        return None

    async def invoke_async(self, work: Work) -> Outcome:
        """Await an async handler for a Work's one message (on the event loop)."""
        clock = self._clock
        started = clock()
        outcome = await self._acall(work.message)
        observer = self._work
        if observer is not None:
            observer.work_ended(clock() - started, 1)
        return outcome

    def _chunk(self, messages: Sequence[Any], deadline: float) -> Partial | None:
        """One call per message; stops early (handing the rest back) once ``deadline`` passed."""
        call = self._call
        clock = self._clock
        failures: list[tuple[int, BaseException]] | None = None
        handled = 0
        last = len(messages)
        for message in messages:
            error = call(message)
            if error is not None:
                if failures is None:
                    failures = []
                failures.append((handled, error))
            handled += 1
            if handled < last and clock() >= deadline:
                return Partial(handled, failures or [])
        return None if failures is None else Partial(handled, failures)

    def _plain_call(self) -> Callable[[Any], BaseException | None]:
        handler = self.handler

        def call(message: Any) -> BaseException | None:
            try:
                result = handler(message)
            except BaseException as err:
                # Any failure -- SystemExit, KeyboardInterrupt or a CancelledError leaking from library
                # code too -- is the message's: retried, then ON_FAILURE; never the worker's end.
                return err
            return None if result is None else result_error(result)

        return call

    def _timed_call(self) -> Callable[[Any], BaseException | None]:
        handler, observers, local = self.handler, self._calls, self._local
        wants_cpu = any(o.wants_cpu for o in observers)
        clock, cpu_clock = self._clock, self._cpu_clock
        mask = CPU_SAMPLE_EVERY - 1

        def call(message: Any) -> BaseException | None:
            try:
                tally = local.clock
            except AttributeError:
                tally = local.clock = _CallClock()
            on_cpu = wants_cpu and (tally.slow or not tally.count & mask)
            cpu_started = cpu_clock() if on_cpu else 0.0
            started = clock()
            try:
                result = handler(message)
                error = None if result is None else result_error(result)
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

    def _plain_acall(self) -> Callable[[Any], Awaitable[BaseException | None]]:
        handler = self.handler

        async def call(message: Any) -> BaseException | None:
            try:
                await handler(message)  # type: ignore[misc]
            except BaseException as err:  # CancelledError too: the runner tells its own from the handler's
                return err
            return None

        return call

    def _timed_acall(self) -> Callable[[Any], Awaitable[BaseException | None]]:
        handler, observers = self.handler, self._calls
        clock = self._clock

        async def call(message: Any) -> BaseException | None:
            started = clock()
            error: BaseException | None = None
            try:
                await handler(message)  # type: ignore[misc]
            except BaseException as err:  # see _plain_acall
                error = err
            seconds = clock() - started
            for observer in observers:  # the loop thread runs other coroutines meanwhile: no CPU share
                observer.call_ended(seconds, None)
            return error

        return call


def pickled_handler(handler: Handler, name: str) -> bytes:
    """``handler`` pickled for worker processes -- a module-level function travels as its importable name
    (``module.qualname``); a partial or an object as its parts -- or HandlerRefused saying why it cannot."""
    if handler_name(handler).startswith("__main__."):
        raise HandlerRefused(
            f"handler {name} is defined in the script being run (__main__): worker processes import a handler "
            "by its module's name; move it into a module (e.g. myapp/jobs.py) and pass myapp.jobs.handle"
        )
    try:
        return pickle.dumps(handler, pickle.HIGHEST_PROTOCOL)
    except BaseException as err:  # a lambda, a nested function, an object holding a lock or a client
        raise HandlerRefused(
            f"handler {name} cannot be sent to worker processes ({type(err).__name__}: {safe_text(err)}); give a "
            "function defined at the top level of an importable module (or a picklable object)"
        ) from None
