"""The runner for ``async def`` handlers: each worker shift is a task on one event-loop thread.

Same dispatcher, same permits, same steps as :class:`mtc75.runtime.runner.ThreadRunner`: a shift is the
dispatcher's generator (``WorkerSteps.shift``); it yields a message, the task awaits the invoker
(:meth:`mtc75.runtime.invoker.Invoker.invoke_async`) and sends back the outcome, until the generator returns
(its permit went back). ``MAX_THREAD_COUNT``
therefore bounds the coroutines in flight exactly as it bounds threads, a retry waiting out its backoff
holds no task (the dispatcher's delay queue holds it), and resizing is the permits' business alone: a
task costs no thread, so :meth:`AsyncRunner.grow` has nothing to grow.

What a thread cannot do and a task can: be cancelled. :meth:`AsyncRunner.cancel` cancels the handlers
running messages of given assignments (a revoke that waited its REVOKE_TIMEOUT for them); the cancelled
message settles as a failure with ``CancelledError``, and since the engine cancels only after the
partition's assignment is revoked, that failure is neither retried nor committed (a late completion,
dropped). :meth:`AsyncRunner.shutdown` cancels whatever still runs and stops the loop within a bound.

Thread contract: ``spawn``, ``grow``, ``cancel``, ``shutdown`` and the ``running`` / ``loop_thread``
reads from the poll thread (any thread would do: they hand work to the loop with
``call_soon_threadsafe``); shifts, ``_running`` and ``_cancelled`` live on the loop thread only. A shift
task cancelled before its first step (only at shutdown: revoke cancels running handlers) never took
its shift, and its permit goes with the dispatcher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from mtc75.core.offsets import PartitionState
from mtc75.core.work import Work
from mtc75.runtime.aio import EventLoopThread, LoopError
from mtc75.runtime.invoker import Invoker
from mtc75.runtime.process_runner import ProcessRunner
from mtc75.runtime.runner import RunnerFactory, ThreadRunner, WorkerSteps, mark_worker

logger = logging.getLogger(__name__)

STOP_TIMEOUT = 2.0  # seconds shutdown waits for cancelled handlers to end and the loop thread to join


def runner_for(invoker: Invoker) -> RunnerFactory:
    """Where ``invoker``'s handler runs: coroutines on one event loop for an async one, worker processes for
    a plain one with ``processes`` (RUNNER="processes"), else threads."""
    if invoker.is_async:
        return AsyncRunner
    return ProcessRunner if invoker.processes else ThreadRunner


class RevokeCancelled(asyncio.CancelledError):
    """Stands for a handler cancelled because its partition was revoked (the error its message settles with)."""


class AsyncRunner:
    """Runs each worker shift as a task on one :class:`EventLoopThread` (started here)."""

    workers = "coroutines"
    takes_chunks = False  # one coroutine per message: chunks would serialise awaits that could overlap

    def __init__(self, steps: WorkerSteps, invoker: Invoker, limit: int = 0, *, use_uvloop: bool = True) -> None:
        # ``limit`` (the permits) is accepted for the runner factory's signature: tasks need no pool size
        self._steps = steps
        self._invoker = invoker
        self.loop_thread = EventLoopThread(invoker.name, use_uvloop=use_uvloop)
        self.loop_thread.start()
        self.loop_thread.call_soon(mark_worker, steps)  # before any shift: call_soon keeps the order
        self._loop = self.loop_thread.loop
        self._shifts: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        self._running: dict[asyncio.Task[None], Work] = {}  # shift -> the message its handler runs
        self._cancelled: set[asyncio.Task[None]] = set()  # shifts whose handler we cancelled
        self.cancelled = 0  # handlers cancelled (revoke or shutdown); read as a hint from other threads

    # -- poll-thread side ---------------------------------------------------------------------------

    def spawn(self, count: int) -> None:
        """Start ``count`` shifts, each holding a permit the dispatcher already took for it."""
        if count > 0:
            try:
                self.loop_thread.call_soon(self._spawn, count)
            except LoopError:
                pass  # shut down: nothing starts any more (the permits go with the dispatcher)

    def grow(self, limit: int) -> None:
        """Nothing to grow: the permits alone bound the tasks (see the module notes)."""

    def cancel(self, states: Iterable[PartitionState]) -> None:
        """Cancel the running handlers of messages fetched under ``states`` (their assignments ended)."""
        # the states themselves (identity-hashed), not their ids: a freed state's id may be reused by
        # the next assignment's before the loop gets to this
        wanted = set(states)
        if wanted:
            try:
                self.loop_thread.call_soon(self._cancel_where, lambda w: w.state in wanted)
            except LoopError:
                pass  # stopped: nothing runs any more

    @property
    def running(self) -> int:
        """Handlers running now (a hint, read without the loop)."""
        return len(self._running)

    def shutdown(self, wait: bool) -> None:
        """Start nothing more; cancel what still runs, let it settle, stop the loop: all within STOP_TIMEOUT.

        The engine calls this after its own bounded wait for running handlers (SHUTDOWN_TIMEOUT) and its
        last commit, so what is cancelled here was abandoned and stays uncommitted. Unlike a thread, a
        coroutine can be cancelled, so ``wait`` changes nothing: both end every task, within the bound.
        """
        if not self.loop_thread.running:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        try:
            self.loop_thread.submit(self._cancel_and_wait()).result(STOP_TIMEOUT)
        except Exception as err:  # a handler ignoring cancellation or blocking the loop: stop() is bounded too
            logger.debug("async runner: cancelled handlers did not end in time: %r", err)
        if not self.loop_thread.stop(max(0.1, deadline - time.monotonic())):
            logger.warning(
                "event loop of handler %s did not stop within %.0fs (a handler blocks it); left behind",
                self.loop_thread.label, STOP_TIMEOUT,
            )

    # -- loop thread --------------------------------------------------------------------------------

    def _spawn(self, count: int) -> None:
        create = self._loop.create_task
        shifts = self._shifts
        for _ in range(count):
            task = create(self._shift())
            shifts.add(task)
            task.add_done_callback(shifts.discard)

    def _cancel_where(self, chosen: Callable[[Work], bool]) -> None:
        for task, work in list(self._running.items()):
            if chosen(work) and task not in self._cancelled:
                self._cancelled.add(task)
                self.cancelled += 1
                task.cancel()

    async def _cancel_and_wait(self) -> None:
        self._cancel_where(lambda _w: True)
        shifts = [t for t in self._shifts if t is not asyncio.current_task()]
        if shifts:
            await asyncio.wait(shifts)

    async def _shift(self) -> None:
        """One shift: the dispatcher's generator yields a message, the invoker awaits the handler, the
        outcome goes back, until StopIteration (the permit went back)."""
        task = asyncio.current_task()
        assert task is not None
        shift = self._steps.shift()
        send = shift.send
        invoke, running, cancelled = self._invoker.invoke_async, self._running, self._cancelled
        try:
            work = next(shift)
            while True:
                running[task] = work
                try:
                    outcome = await invoke(work)
                finally:
                    del running[task]
                if task in cancelled:
                    # Ours (a revoke or shutdown cancelled it), whatever the handler made of it: the
                    # message's failure, never the end of the shift. A CancelledError the handler raised
                    # on its own is a plain failure (the invoker returned it).
                    cancelled.discard(task)
                    task.uncancel()  # the request was for that handler; the shift goes on
                    if outcome is not None:
                        outcome = RevokeCancelled("cancelled: its partition was revoked or the consumer stopped")
                work = send(outcome)
        except StopIteration:
            return  # the permit went back
        finally:
            shift.close()  # a no-op once it returned; otherwise (an unexpected error) the permit comes back
