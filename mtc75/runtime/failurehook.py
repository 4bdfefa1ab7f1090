"""The ``on_error`` hook's delivery: failure reports in a bounded queue, the user's function on a thread of its own.

Reports come from two places: a worker (or, for ``async def`` handlers, the event loop) right after a failed
attempt that will be retried (:meth:`mtc75.runtime.retries.Retries.fail`), and the poll thread
where a message's outcome is decided (the ledger and the ON_FAILURE policies). Neither may wait for user code:
a worker holds a permit, the poll thread keeps the consumer in its group. So :meth:`FailureHook.report` only
appends to a queue, and one thread, ``mtc75-on-error``, calls the hook with each report in the order they were
made (a message's retries before its final call). Whatever the hook does cannot reach the engine: any
``BaseException`` it raises is caught and logged (the first, then one line in ``LOG_EVERY``), a hook that
blocks only fills the queue, and a report that finds the queue full (``CAPACITY``) is dropped and counted,
never waited for. At the end of a run :meth:`FailureHook.close` delivers what is queued within the shutdown's
deadline; a hook still running then is left to finish on its (daemon) thread, and what was not delivered is
said in one line.

Threads: :meth:`report` from any thread (a short lock; never blocks on the hook); :meth:`start` and
:meth:`close` on the poll thread; the hook on ``mtc75-on-error`` only.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import deque
from collections.abc import Callable

from mtc75.core.failures import Failure, FailureOutcome
from mtc75.core.work import Work
from mtc75.errors import ConfigError
from mtc75.runtime.handlers import describe_error

logger = logging.getLogger(__name__)

CAPACITY = 10_000  # queued reports at most; each holds a message and an exception (with its traceback)
LOG_EVERY = 100  # a hook that raises, or reports dropped: logged the first time, then once in this many
THREAD_NAME = "mtc75-on-error"

OnError = Callable[[Failure], object]


def check_on_error(hook: object) -> OnError | None:
    """``on_error=`` as given (None: no hook); refuses, with a ConfigError, what cannot be called with a Failure."""
    if hook is None:
        return None
    if not callable(hook):
        raise ConfigError(f"invalid on_error={hook!r}: must be a function taking an mtc75.Failure")
    call = getattr(type(hook), "__call__", None)  # noqa: B004 - an object whose __call__ is async def
    if any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in (hook, call)):
        raise ConfigError("on_error must be a plain function: it is called on a thread of its own and not awaited "
                          "(to reach async code, hand the Failure over, e.g. loop.call_soon_threadsafe)")
    return hook  # type: ignore[return-value]


class FailureHook:
    """Calls ``hook(failure)`` on its own thread for every report (see the module notes)."""

    def __init__(self, hook: OnError, capacity: int = CAPACITY, log_every: int = LOG_EVERY) -> None:
        self._hook = hook
        self._capacity = capacity
        self._log_every = log_every
        self._queue: deque[Failure] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._closing = False  # no more reports taken; the thread ends once the queue is empty
        self._discard = False  # close() gave up: the thread delivers nothing more
        self._thread: threading.Thread | None = None
        self.delivered = 0  # hook calls that returned
        self.raised = 0  # hook calls that raised
        self.dropped = 0  # reports not delivered: the queue was full, or close() gave up on them

    def start(self) -> None:
        thread = threading.Thread(target=self._deliver, name=THREAD_NAME, daemon=True)
        thread.start()
        self._thread = thread

    def on_thread(self) -> bool:
        """True on the hook's own thread (it must not wait for the run that feeds it)."""
        return self._thread is not None and threading.current_thread() is self._thread

    # -- any thread ------------------------------------------------------------------------------------

    def report(self, work: Work, outcome: FailureOutcome) -> None:
        """Queue one Failure per message of ``work`` (its last failure, as ``outcome``); never blocks."""
        exception = work.exception
        if exception is None:
            return  # never failed (a Work given up before it ran): nothing to report
        attempt = work.attempts
        if not attempt and work.batch is not None:  # a piece of a batch, waiting for its first attempt alone
            attempt = work.batch.attempts
        dropped = 0
        say = False
        with self._ready:
            if self._closing:
                return
            for message in work.messages:
                if len(self._queue) >= self._capacity:
                    dropped += 1
                    continue
                self._queue.append(Failure(message, exception, attempt, outcome))
            self._ready.notify()
            if dropped:
                before = self.dropped
                self.dropped += dropped
                say = before // self._log_every != self.dropped // self._log_every or not before
        if dropped and say:
            logger.warning("on_error is slower than the failures: %d failure reports dropped so far (%d queued); "
                           "handling goes on", self.dropped, self._capacity)

    # -- the poll thread -------------------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        """Take no more reports; deliver the queued ones within ``timeout`` seconds, then stop delivering."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        thread = self._thread
        if thread is None:
            return
        thread.join(max(0.0, timeout))
        if not thread.is_alive():
            return
        with self._ready:
            self._discard = True
            left = len(self._queue)
            self._queue.clear()
            self.dropped += left
        logger.warning("on_error did not return within %.1fs at shutdown: %d failure reports not delivered (the "
                       "call under way finishes on its own)", timeout, left)

    # -- the hook's thread -----------------------------------------------------------------------------

    def _deliver(self) -> None:
        hook, ready, queue = self._hook, self._ready, self._queue
        while True:
            with ready:
                while not queue and not self._closing:
                    ready.wait()
                if not queue or self._discard:
                    return
                failure = queue.popleft()
            try:
                hook(failure)
            except BaseException as err:  # SystemExit, KeyboardInterrupt too: the hook's, not the consumer's
                self.raised += 1
                if self.raised == 1 or not self.raised % self._log_every:
                    logger.warning("on_error raised %s (%d times so far); ignored", describe_error(err), self.raised,
                                   exc_info=(type(err), err, err.__traceback__))
                continue
            self.delivered += 1

