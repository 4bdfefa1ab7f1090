"""Runners: what executes handlers. The dispatcher decides what runs; a runner only provides workers.

Thread contract: the dispatcher calls ``spawn``, ``grow`` and ``shutdown`` from the poll thread (the
dispatcher's owner) only. A runner's workers call nothing but :meth:`WorkerSteps.shift` and the
generator it returns, each shift driven by one worker at a time, and the handler between its steps.
Each worker thread marks itself once, when it starts (:func:`mark_worker`); :func:`runs_handlers_for`
reads that mark on the calling thread, from any thread.

A worker's life is one *shift*: it starts holding one permit the dispatcher already took for it (the
reason it was spawned) and drives its shift generator -- ``work = next(shift)``, call the handler,
``work = shift.send(error)`` (None when the handler returned) -- until StopIteration, which means the
permit went back. The steps between two handler calls (settle the last message: release it and
report it, or schedule its retry; promote due retries; take the next message or give the permit
back) all live in the dispatcher, so a runner is only "call the handler": :class:`ThreadRunner` runs
each shift on a pool thread today; an asyncio runner (async handlers, next) runs each shift as a task
on one event-loop thread, ``await``-ing the handler between the same steps, bounded by the same
permits. Its ``spawn`` would hand the tasks to the loop with ``call_soon_threadsafe``; the steps
themselves never block for long (they may take the dispatcher's lock and yield once with
``time.sleep(0)``). A runner that drops a shift half-way closes it: the permit still comes back.

Runs (mtc75/core/work.py): a runner that sets ``RUNS`` may be handed a ``Work`` of several messages.
It calls the handler on each in order (:func:`handle_run`) and sends back None when every call
returned, else a :class:`Partial`: how many messages the handler saw and which of them raised. It
stops early, handing the rest back, once a run has lasted ``RUN_SECONDS``: runs are sized for 1 ms
of the measured time per message, so a run that lasts this long holds a handler that turned slow,
and its other messages must be free for the other workers. A single message is
settled as before: None or its error. The asyncio runner takes single messages only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol

from mtc75.core.work import Work
from mtc75.runtime.handlers import Handler, result_error

# A run still going after this long is handed back, its rest for the other workers (see the module
# notes). Runs are sized for RUN_TARGET (mtc75/runtime/dispatcher.py), 1 ms: twenty times that, four
# of the interpreter's 5 ms GIL switch intervals, is a handler that turned slow, not a worker that
# waited its turn for the GIL. A cut forgets the time per message: single messages until measured again.
RUN_SECONDS = 0.02


# Whose handlers the current thread runs: set once, when a worker thread (or the event-loop thread) starts,
# so that the API can refuse a call that would wait for the calling handler itself (close() from a handler).
_worker = threading.local()


def mark_worker(steps: object) -> None:
    """Called on a new worker thread (or event-loop thread): it runs handlers for ``steps`` (a dispatcher)."""
    _worker.steps = steps


def runs_handlers_for(steps: object) -> bool:
    """True on a thread that runs handlers for ``steps``: one of its workers, or its event-loop thread."""
    return getattr(_worker, "steps", None) is steps


class Partial(NamedTuple):
    """A run that did not simply succeed: the handler saw its first ``handled`` messages, and
    ``failures`` holds ``(index, error)`` for each of them that raised."""

    handled: int
    failures: list[tuple[int, BaseException]]


# What a worker sends back for the Work it ran: None (done), the error of a single message, or a Partial.
Outcome = "BaseException | Partial | None"

# A worker's shift (see the module notes): yields the next message (or run) to run, is sent its
# outcome, and returns once the permit went back.
Shift = Generator[Work, Outcome, None]


class WorkerSteps(Protocol):
    """What the dispatcher offers a runner's workers."""

    def shift(self) -> Shift:
        """A new shift for a spawned worker, which holds one permit."""


class Runner(Protocol):
    """Starts workers; called from the poll thread only."""

    def spawn(self, count: int) -> None:
        """Start ``count`` workers, each holding a permit the dispatcher already took for it."""

    def grow(self, limit: int) -> None:
        """Be able to run ``limit`` workers at once (never interrupts running ones)."""

    def shutdown(self, wait: bool) -> None:
        """Start nothing more; with ``wait``, return once every running worker has ended."""


def handle_run(handler: Handler, messages: Sequence[Any], deadline: float) -> Partial | None:
    """Call ``handler`` on each message in order; None when every call returned (see the module notes)."""
    failures: list[tuple[int, BaseException]] | None = None
    clock = time.monotonic
    handled = 0
    last = len(messages)
    for msg in messages:
        try:
            result = handler(msg)
            error = None if result is None else result_error(result)
        except BaseException as err:  # as for a single message: any failure is the message's (see _work)
            error = err
        if error is not None:
            if failures is None:
                failures = []
            failures.append((handled, error))
        handled += 1
        if handled < last and clock() >= deadline:
            return Partial(handled, failures or [])
    return None if failures is None else Partial(handled, failures)


class ThreadRunner:
    """Each shift on a thread of a ThreadPoolExecutor of ``limit`` threads."""

    RUNS = True  # may be handed runs (see the module notes)

    def __init__(self, steps: WorkerSteps, handler: Handler, limit: int) -> None:
        self._steps = steps
        self._handler = handler
        self._executor = self._pool(limit)
        self._workers = limit  # the executor's max_workers; grow() replaces it to grow

    def _pool(self, limit: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=limit, thread_name_prefix="mtc75-worker", initializer=mark_worker,
                                  initargs=(self._steps,))

    def spawn(self, count: int) -> None:
        submit, work = self._executor.submit, self._work
        for _ in range(count):
            submit(work)

    def grow(self, limit: int) -> None:
        """ThreadPoolExecutor cannot grow: a larger one replaces it, the old one finishes its running
        workers and lets its threads go."""
        if limit <= self._workers:
            return
        old = self._executor
        self._executor = self._pool(limit)
        self._workers = limit
        old.shutdown(wait=False)

    def shutdown(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _work(self) -> None:
        """One shift: only the handler call is the runner's own (the shift settles and takes)."""
        shift = self._steps.shift()
        handler = self._handler
        send = shift.send
        clock = time.monotonic
        outcome: BaseException | Partial | None
        try:
            work = next(shift)
            while True:
                if work.size > 1:
                    outcome = handle_run(handler, work.messages, clock() + RUN_SECONDS)
                    work = send(outcome)
                    continue
                try:
                    result = handler(work.message)
                    outcome = None if result is None else result_error(result)
                except BaseException as err:
                    # Any handler failure -- BaseExceptions too (SystemExit, KeyboardInterrupt or a
                    # CancelledError leaking from library code) -- is retried and then goes to
                    # ON_FAILURE: it must not kill the worker, lose its permit or strand its commit.
                    outcome = err
                work = send(outcome)
        except StopIteration:
            return  # the permit went back
