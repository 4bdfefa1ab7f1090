"""Runners: what executes handlers. The dispatcher decides what runs; a runner only provides workers.

Thread contract: the dispatcher calls ``spawn``, ``grow`` and ``shutdown`` from the poll thread (the
dispatcher's owner) only. A runner's workers call nothing but the :class:`WorkerSteps` the dispatcher
hands it (``begin_shift``, ``next_work``, ``settle``, ``abandon_shift``), each from the worker that
holds the shift, and the handler between ``next_work`` and ``settle``.

A worker's life is one *shift*: it starts holding one permit the dispatcher already took for it (the
reason it was spawned), then loops ``next_work`` -> handler -> ``settle`` until ``next_work`` returns
None, which means the permit went back. The permit, scheduler and retry bookkeeping all live in those
steps, so a runner is only "call the handler": :class:`ThreadRunner` runs each shift on a pool thread
today; an asyncio runner (async handlers, next) runs each shift as a task on one event-loop thread,
``await``-ing the handler between the same steps, bounded by the same permits. Such a runner would
hand its ``spawn`` calls to the loop with ``call_soon_threadsafe``; the steps themselves never block
for long (``next_work`` may take the dispatcher's lock and yield once with ``time.sleep(0)``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from mtc75.core.work import Work
from mtc75.runtime.handlers import Handler, result_error

logger = logging.getLogger(__name__)


class Shift:
    """One worker's hold on one permit, from its start until ``next_work`` returns None.

    Owned by that worker alone; the dispatcher reads it when the shift ends (time per message).
    """

    __slots__ = ("started", "handled")

    def __init__(self, started: float) -> None:
        self.started = started  # time.monotonic() when the worker began
        self.handled = 0  # messages taken during the shift


class WorkerSteps(Protocol):
    """What the dispatcher offers a runner's workers (see the module notes)."""

    def begin_shift(self) -> Shift:
        """Called first by a spawned worker, which holds one permit."""

    def next_work(self, shift: Shift) -> Work | None:
        """The next message to run, or None once the permit went back (the worker ends)."""

    def settle(self, work: Work, error: BaseException | None) -> None:
        """The handler returned (``error`` None) or raised ``error``: retry it or complete it."""

    def abandon_shift(self, shift: Shift) -> None:
        """The worker stops on an unexpected error outside the handler: give its permit back."""


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
        """One shift: only the handler call is the runner's own; the permit always comes back."""
        steps = self._steps
        shift = steps.begin_shift()
        try:
            handler, next_work, settle = self._handler, steps.next_work, steps.settle
            while True:
                work = next_work(shift)
                if work is None:
                    return
                try:
                    result = handler(work.message)
                    error = None if result is None else result_error(result)
                except BaseException as err:
                    # Any handler failure -- BaseExceptions too (SystemExit, KeyboardInterrupt or a
                    # CancelledError leaking from library code) -- is retried and then goes to
                    # ON_FAILURE: it must not kill the worker, lose its permit or strand its commit.
                    error = err
                settle(work, error)
        except BaseException:
            # next_work returns None only after giving the permit back; anything escaping holds one
            steps.abandon_shift(shift)
            logger.exception("worker stopped by an unexpected error")
            raise
