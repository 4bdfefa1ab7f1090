"""Runners: where handlers run. The dispatcher decides what runs; a runner only provides workers.

A worker's life is one *shift*: it starts holding one permit the dispatcher took for it (the reason it was
spawned) and drives its shift generator -- ``work = next(shift)``, have the invoker run it,
``work = shift.send(outcome)`` -- until StopIteration, which means the permit went back. Everything between
two Works (settling the last one, promoting due retries, taking the next one) lives in the dispatcher, and
calling the handler lives in :class:`mtc75.runtime.invoker.Invoker`, so a runner is only "where": a pool
thread per shift (:class:`ThreadRunner`), a task per shift on one event-loop thread
(:class:`mtc75.runtime.async_runner.AsyncRunner`), or a pool thread per shift that sends each Work to a
worker process (:class:`mtc75.runtime.process_runner.ProcessRunner`). A runner that drops a shift
half-way closes it: the permit still comes back.

Thread contract: the dispatcher calls ``spawn``, ``grow``, ``cancel`` and ``shutdown`` from the poll thread
only. A runner's workers call nothing but their shift generator and the invoker. Each worker thread marks
itself once, when it starts (:func:`mark_worker`); :func:`runs_handlers_for` reads that mark, on any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from mtc75.core.offsets import PartitionState
from mtc75.core.work import Work
from mtc75.runtime.invoker import Invoker, Outcome

# A worker's shift: yields the next Work to run, is sent its outcome, returns once the permit went back.
Shift = Generator[Work, Outcome, None]


class WorkerSteps(Protocol):
    """What the dispatcher offers a runner's workers."""

    def shift(self) -> Shift:
        """A new shift for a spawned worker, which holds one permit."""


class Runner(Protocol):
    """Starts workers; called from the poll thread only."""

    workers: str  # what MAX_THREAD_COUNT bounds here, for the status line: "threads", "coroutines", "messages"
    takes_chunks: bool  # may be handed a Work of several consecutive messages (mtc75/core/work.py)

    def spawn(self, count: int) -> None:
        """Start ``count`` workers, each holding a permit the dispatcher already took for it."""

    def grow(self, limit: int) -> None:
        """Be able to run ``limit`` workers at once (never interrupts running ones)."""

    def cancel(self, states: Iterable[PartitionState]) -> None:
        """Stop the running handlers of these (revoked) assignments, where that is possible."""

    def shutdown(self, wait: bool) -> None:
        """Start nothing more; with ``wait``, return once every running worker has ended."""


# Builds the runner for a dispatcher: (its worker steps, the invoker, max_thread_count) -> Runner.
RunnerFactory = Callable[[WorkerSteps, Invoker, int], Runner]

# Whose handlers the current thread runs: set once, when a worker thread (or the event-loop thread) starts,
# so that the API can refuse a call that would wait for the calling handler itself (close() from a handler).
_worker = threading.local()


def mark_worker(steps: object) -> None:
    """Called on a new worker thread (or event-loop thread): it runs handlers for ``steps`` (a dispatcher)."""
    _worker.steps = steps


def runs_handlers_for(steps: object) -> bool:
    """True on a thread that runs handlers for ``steps``: one of its workers, or its event-loop thread."""
    return getattr(_worker, "steps", None) is steps


class ThreadRunner:
    """Each shift on a thread of a ThreadPoolExecutor of ``limit`` threads."""

    workers = "threads"
    takes_chunks = True

    def __init__(self, steps: WorkerSteps, invoker: Invoker, limit: int) -> None:
        self._steps = steps
        self._invoker = invoker
        self._invoke: Callable[[Work], Outcome] = invoker.invoke  # what a shift does with a Work here
        self._executor = self._pool(limit)
        self._size = limit  # the executor's max_workers; grow() replaces it to grow

    def _pool(self, limit: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=limit, thread_name_prefix="mtc75-worker", initializer=mark_worker,
                                  initargs=(self._steps,))

    def spawn(self, count: int) -> None:
        submit, shift = self._executor.submit, self._shift
        for _ in range(count):
            submit(shift)

    def grow(self, limit: int) -> None:
        """ThreadPoolExecutor cannot grow: a larger one replaces it, the old one finishes its running
        workers and lets its threads go."""
        if limit <= self._size:
            return
        old = self._executor
        self._executor = self._pool(limit)
        self._size = limit
        old.shutdown(wait=False)

    def cancel(self, states: Iterable[PartitionState]) -> None:
        """Threads cannot be cancelled: their completions arrive late and are dropped."""

    def shutdown(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _shift(self) -> None:
        shift = self._steps.shift()
        send = shift.send
        invoke = self._invoke
        try:
            work = next(shift)
            while True:
                work = send(invoke(work))
        except StopIteration:
            return  # the permit went back
