"""The one handler path: the only place that calls the user's handler, and the only one that knows its kind.

A handler is *sync* (a plain function: called on a worker thread) or *async* (``async def``, an object whose
``__call__`` is one, a ``functools.partial`` of either: awaited on the event loop), and takes one message or,
with ``BATCH_SIZE`` > 1, a *batch*: a list of one partition's messages in offset order. :class:`Invoker`
turns one ``Work`` -- a single message, a chunk of consecutive messages for a fast per-message handler, or a
batch -- into its ``Outcome``: None when the work is done, the error of a single message or of a whole
batch, or a :class:`Partial` saying which messages of a chunk or batch failed (a batch handler names them
with :class:`mtc75.errors.BatchError`) and how many ran. Every failure counts, ``BaseException`` included,
and so does a plain function that *returns* an awaitable (nothing awaits it, so its work never ran).

What a handler returns is read here alone: None is the fast path (nothing else is looked at); output
records (:mod:`mtc75.core.output`) go onto the Work as ``(offset, Output)`` pairs, which the worker owns
while it runs it (a batch's are its own: every message of the batch is done once they are written); a
malformed one is the call's failure; any other value is ignored, with one warning per type.

With a ``decode`` function (deserializers, mtc75/kafka/deserializers.py) each call decodes its message
first, on the same worker, and the handler gets what it returned; a decode that raises is that message's
failure, like a raise of the handler. Without one the handler is called with the fetched message as is.

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

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, Protocol

from mtc75.core.output import Output, ignored_type, outputs_of
from mtc75.core.work import Work
from mtc75.errors import BatchError
from mtc75.runtime.handlers import Handler, handler_name, is_async_handler, prepare_handler, result_error
from mtc75.runtime.procworker import Reply
from mtc75.runtime.shipping import pickled_handler

logger = logging.getLogger(__name__)

# Four of the interpreter's 5 ms GIL switch intervals: a handler that turned slow, not a worker that waited
# its turn for the GIL (chunks are sized for ~1 ms, mtc75/runtime/pacing.py CHUNK_TARGET).
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


# What a Work came to: None (done), the error of a single message or a whole batch, or a Partial.
Outcome = BaseException | Partial | None
# What one call came to: None (done), its error, or the output records it returned (done, to be written).
CallResult = BaseException | list[Output] | None
# Output records of a run of messages: (index of the message, Output); None: none.
Outputs = list[tuple[int, Output]] | None


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
        self, handler: Handler, *, name: str | None = None, decode: Callable[[Any], Any] | None = None,
        batches: bool = False, processes: int = 0,
        clock: Callable[[], float] = time.perf_counter, cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.handler = prepare_handler(handler, name)  # refuses what no runner can run
        self.is_async = is_async_handler(self.handler)  # awaited on the event loop
        self.batches = batches  # the handler takes a list of messages (BATCH_SIZE > 1 at start-up)
        self.name = name or handler_name(self.handler)
        self.decode = decode
        # What each call calls: the handler, or the handler of the decoded message (a call's time includes
        # the decoding). For an async handler it returns the coroutine, so the decoding runs on the loop.
        # A batch is decoded message by message before its one call (:meth:`_decoded`).
        self._target: Handler = self.handler if decode is None or batches else _decoding(self.handler, decode)
        # worker processes to run a plain handler in (RUNNER="processes"), 0 for threads; its pickle, made once
        self.processes = 0 if self.is_async else processes
        self.pickled = pickled_handler(self.handler, self.name, decode, batches) if self.processes else b""
        self._clock, self._cpu_clock = clock, cpu_clock  # wall and this thread's CPU seconds (tests: fakes)
        # A chunk stops at its first failure (set by the dispatcher of an ordered mode: the messages after it
        # are of the same key or partition and must wait for its retry); else it goes on with the next one.
        self.ordered = False
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
        """Run a Work of a sync handler on this thread: one call per message in offset order, or one per batch."""
        clock = self._clock
        started = clock()
        if work.size == 1 and not self.batches:  # the single message's path, inline
            result = self._call(work.message)
            if result is not None and type(result) is list:  # output records: done, once written
                work.outputs = [(work.offset, output) for output in result]
                result = None
            outcome: Outcome = result
            handled = 1
        else:
            outcome, handled, outputs = self._run(work.messages, started)
            if outputs is not None:
                offsets = work.offsets
                work.outputs = [(offsets[index], output) for index, output in outputs]
        observer = self._work
        if observer is not None:
            observer.work_ended(clock() - started, handled)
        return outcome

    def run_messages(self, messages: Sequence[Any]) -> tuple[Outcome, int, float, Outputs]:
        """:meth:`invoke` without a Work, in a worker process: the outcome, how many messages the handler
        saw, their handler seconds, and the output records as ``(index, Output)``."""
        clock = self._clock
        started = clock()
        outcome, handled, outputs = self._run(messages, started)
        return outcome, handled, clock() - started, outputs

    def _run(self, messages: Sequence[Any], started: float) -> tuple[Outcome, int, Outputs]:
        """A batch, a chunk or one message: the outcome, the messages the handler saw, the output records
        (``(index, Output)``; a batch's go with its first message the handler got)."""
        if self.batches:
            given, where, undecoded = self._decoded(messages)
            result = self._call(given) if given else None
            outputs = None
            if result is not None and type(result) is list:
                outputs, result = [(where[0], output) for output in result], None
            return _batch_outcome(given, where, undecoded, result), len(messages), outputs
        if len(messages) == 1:
            result = self._call(messages[0])
            if result is not None and type(result) is list:
                return None, 1, [(0, output) for output in result]
            return result, 1, None
        return self._chunk(messages, started + CHUNK_SECONDS)

    def invoke_in(self, pool: WorkerCalls, work: Work) -> Outcome:
        """Run a Work of a process handler in one of ``pool``'s worker processes (this thread waits)."""
        state = work.state
        calls = self._calls
        reply = pool.call(work.messages, bool(calls), state, lambda: state.alive and not state.closing)
        if reply.lost is not None:
            # Not run to its end: its worker process died (or was stopped) running it, or it was given up
            # before it was sent. A chunk goes back as single messages, untried (one that kills its process
            # fails alone when it runs again); a single message or a batch fails, and is retried unless given up.
            return reply.lost if work.size == 1 or self.batches else Partial(0, [])
        observer = self._work
        if observer is not None:
            observer.work_ended(reply.seconds, reply.handled)
        if reply.calls:
            for seconds, cpu in reply.calls:
                for call_observer in calls:
                    call_observer.call_ended(seconds, cpu)
        if reply.outputs:
            offsets = work.offsets
            work.outputs = [(offsets[index], output) for index, output in reply.outputs]
        failures = reply.failures
        if failures and failures[0][0] < 0:  # the whole batch failed (procworker.WHOLE)
            return failures[0][1]
        if work.size == 1:
            return failures[0][1] if failures else None
        if failures or reply.handled < work.size:
            return Partial(reply.handled, failures)
        return None

    async def invoke_async(self, work: Work) -> Outcome:
        """Await an async handler for a Work's one message, or its batch (on the event loop)."""
        clock = self._clock
        started = clock()
        if self.batches:
            given, where, undecoded = self._decoded(work.messages)
            result = await self._acall(given) if given else None
            if result is not None and type(result) is list:
                work.outputs, result = [(work.offsets[where[0]], output) for output in result], None
            outcome = _batch_outcome(given, where, undecoded, result)
        else:
            result = await self._acall(work.message)
            if result is not None and type(result) is list:
                work.outputs, result = [(work.offset, output) for output in result], None
            outcome = result
        observer = self._work
        if observer is not None:
            observer.work_ended(clock() - started, work.size)
        return outcome

    def _decoded(self, messages: Sequence[Any]) -> tuple[list[Any], list[int], list[tuple[int, BaseException]]]:
        """A batch as its handler gets it: (the decoded messages, each one's index in the batch, the
        ``(index, error)`` of each message that did not decode -- its failure, the others still run)."""
        decode = self.decode
        if decode is None:
            return list(messages), list(range(len(messages))), []
        given: list[Any] = []
        where: list[int] = []
        undecoded: list[tuple[int, BaseException]] = []
        for index, message in enumerate(messages):
            try:
                given.append(decode(message))
            except BaseException as err:  # a failure of that message, like a raise of the handler
                undecoded.append((index, err))
                continue
            where.append(index)
        return given, where, undecoded

    def _chunk(self, messages: Sequence[Any], deadline: float) -> tuple[Partial | None, int, Outputs]:
        """One call per message; stops early (handing the rest back) once ``deadline`` passed, or at the first
        failure when ``ordered``.

        Untimed (no call observer), the handler is called here directly, inside one ``try`` for the whole
        chunk: no wrapper frame per message, which is most of what a no-op handler's chunk costs. A raise
        resumes the loop at the next message."""
        if self._calls:
            return self._chunk_timed(messages, deadline)
        handler, returned, clock, ordered = self._target, self._returned, self._clock, self.ordered
        failures: list[tuple[int, BaseException]] | None = None
        outputs: list[tuple[int, Output]] | None = None
        handled = 0
        last = len(messages)
        rest: Sequence[Any] = messages
        while True:
            try:
                for message in rest:
                    result = handler(message)
                    handled += 1
                    if result is not None:
                        outputs, failures = _returned_in_chunk(returned(result), handled - 1, outputs, failures)
                        if ordered and failures:
                            return Partial(handled, failures), handled, outputs
                    if handled < last and clock() >= deadline:
                        return Partial(handled, failures or []), handled, outputs
                break
            except BaseException as err:
                # Any failure -- SystemExit, KeyboardInterrupt or a CancelledError leaking from library code
                # too -- is that message's (see _plain_call); the chunk goes on with the next one.
                if failures is None:
                    failures = []
                failures.append((handled, err))
                handled += 1
                if handled >= last:
                    break
                if ordered or clock() >= deadline:
                    return Partial(handled, failures), handled, outputs
                rest = messages[handled:]
        return (None if failures is None else Partial(handled, failures)), handled, outputs

    def _chunk_timed(self, messages: Sequence[Any], deadline: float) -> tuple[Partial | None, int, Outputs]:
        """:meth:`_chunk` with every call timed for the observers (through ``self._call``)."""
        call = self._call
        clock = self._clock
        failures: list[tuple[int, BaseException]] | None = None
        outputs: list[tuple[int, Output]] | None = None
        handled = 0
        last = len(messages)
        ordered = self.ordered
        for message in messages:
            outputs, failures = _returned_in_chunk(call(message), handled, outputs, failures)
            handled += 1
            if handled < last and (clock() >= deadline or (ordered and failures)):
                return Partial(handled, failures or []), handled, outputs
        return (None if failures is None else Partial(handled, failures)), handled, outputs

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
        handler, returned = self._target, self._returned

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
        handler, observers, local, returned = self._target, self._calls, self._local, self._returned
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
        handler, returned = self._target, self._returned

        async def call(message: Any) -> CallResult:
            try:
                result = await handler(message)  # type: ignore[misc]
            except BaseException as err:  # CancelledError too: the runner tells its own from the handler's
                return err
            return None if result is None else returned(result)

        return call

    def _timed_acall(self) -> Callable[[Any], Awaitable[CallResult]]:
        handler, observers, returned = self._target, self._calls, self._returned
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


def _returned_in_chunk(
    result: CallResult, index: int, outputs: list[tuple[int, Output]] | None,
    failures: list[tuple[int, BaseException]] | None,
) -> tuple[list[tuple[int, Output]] | None, list[tuple[int, BaseException]] | None]:
    """A chunk's ``(outputs, failures)`` with the result of its message ``index`` added (lists made on need)."""
    if result is None:
        return outputs, failures
    if type(result) is list:  # output records: done, once written
        if outputs is None:
            outputs = []
        outputs.extend((index, output) for output in result)
        return outputs, failures
    if failures is None:
        failures = []
    failures.append((index, result))  # type: ignore[arg-type]
    return outputs, failures


def _decoding(handler: Handler, decode: Callable[[Any], Any]) -> Handler:
    """``handler`` called with ``decode(message)``: what a raise of either means is the call's to decide."""

    def target(message: Any) -> object:
        return handler(decode(message))

    return target


def _batch_outcome(given: list[Any], where: list[int], undecoded: list[tuple[int, BaseException]],
                   error: BaseException | None) -> Outcome:
    """A batch call's outcome: a BatchError naming messages of ``given`` (the list the handler got: ``where``
    maps it to the batch) becomes a Partial (the rest is done); one that names none, or a message not in
    the list, fails the whole list. A message that did not decode (``undecoded``) failed alone."""
    size = len(given) + len(undecoded)
    if isinstance(error, BatchError):
        named: dict[int, BaseException] = {}
        for ref, exc in error.failures:
            index = ref if isinstance(ref, int) and not isinstance(ref, bool) else _index_of(given, ref)
            if not 0 <= index < len(given) or not isinstance(exc, BaseException):
                error = ValueError(f"BatchError names {ref!r} with {exc!r}: not a message of this batch of "
                                   f"{len(given)} and an exception; the whole batch counts as failed")
                break
            named[index] = exc
        else:
            if not named:
                error = ValueError("BatchError named no failed message; the whole batch counts as failed")
            else:
                return Partial(size, sorted(undecoded + [(where[i], exc) for i, exc in named.items()]))
    if not undecoded:
        return error  # None, or the whole batch's failure
    if error is None:
        return Partial(size, undecoded)
    return Partial(size, sorted(undecoded + [(i, error) for i in where]))


def _index_of(given: list[Any], message: object) -> int:
    """The index of ``message`` (the object itself) in ``given``; -1 when it is not there."""
    return next((i for i, m in enumerate(given) if m is message), -1)
