"""Runners: what executes handlers. The dispatcher decides what runs; a runner only provides workers.

Thread contract: the dispatcher calls ``spawn``, ``grow`` and ``shutdown`` from the poll thread (the
dispatcher's owner) only. A runner's workers call nothing but :meth:`WorkerSteps.shift` and the
generator it returns, each shift driven by one worker at a time, and the handler between its steps.

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
"""

from __future__ import annotations

from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from mtc75.core.work import Work
from mtc75.runtime.handlers import Handler, result_error

# A worker's shift (see the module notes): yields the next message to run, is sent the handler's
# error (None for success) for it, and returns once the permit went back.
Shift = Generator[Work, "BaseException | None", None]


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


class ThreadRunner:
    """Each shift on a thread of a ThreadPoolExecutor of ``limit`` threads."""

    def __init__(self, steps: WorkerSteps, handler: Handler, limit: int) -> None:
        self._steps = steps
        self._handler = handler
        self._executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="mtc75-worker")
        self._workers = limit  # the executor's max_workers; grow() replaces it to grow

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
        self._executor = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="mtc75-worker")
        self._workers = limit
        old.shutdown(wait=False)

    def shutdown(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _work(self) -> None:
        """One shift: only the handler call is the runner's own (the shift settles and takes)."""
        shift = self._steps.shift()
        handler = self._handler
        send = shift.send
        try:
            work = next(shift)
            while True:
                try:
                    result = handler(work.message)
                    error = None if result is None else result_error(result)
                except BaseException as err:
                    # Any handler failure -- BaseExceptions too (SystemExit, KeyboardInterrupt or a
                    # CancelledError leaking from library code) -- is retried and then goes to
                    # ON_FAILURE: it must not kill the worker, lose its permit or strand its commit.
                    error = err
                work = send(error)
        except StopIteration:
            return  # the permit went back
