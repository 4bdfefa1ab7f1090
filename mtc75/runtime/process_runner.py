"""The runner of ``RUNNER = "processes"``: each shift on a pool thread, each Work in a worker process.

For handlers that compute in Python: the GIL lets one thread compute at a time, so threads cannot use a
second core; worker processes can (:mod:`mtc75.runtime.procpool`). Everything else is the thread
runner's: the same shifts, permits, scheduler, retries and completions -- a shift's thread only waits
while a worker process runs its Work (:meth:`mtc75.runtime.invoker.Invoker.invoke_in`), so
``MAX_THREAD_COUNT`` bounds the messages in flight: a process runs one Work at a time, the others wait in
the pool for the first free process. Chunks of a fast handler cross as one call each, so the pipe's cost is
paid per chunk, not per message.

The worker processes start with the runner (the dispatcher builds it before any Kafka client exists): a
handler they cannot load is refused (HandlerRefused) before anything connects. :meth:`ProcessRunner.cancel`
kills the processes still running a Work of a revoked partition (the engine calls it once REVOKE_TIMEOUT
passed); :meth:`ProcessRunner.shutdown` kills those still running after SHUTDOWN_TIMEOUT and reaps all.

Threads: as :class:`mtc75.runtime.runner.ThreadRunner` (``spawn``, ``grow``, ``cancel``, ``shutdown`` from the
poll thread); the pool has a thread per process of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from mtc75.core.offsets import PartitionState
from mtc75.runtime.invoker import Invoker
from mtc75.runtime.procpool import ProcessPool
from mtc75.runtime.runner import ThreadRunner, WorkerSteps


class ProcessRunner(ThreadRunner):
    """A pool thread per shift (as ThreadRunner); the handler runs in ``invoker.processes`` worker processes."""

    workers = "messages"  # MAX_THREAD_COUNT bounds the messages in flight in the worker processes
    takes_chunks = True

    def __init__(self, steps: WorkerSteps, invoker: Invoker, limit: int) -> None:
        self.pool = ProcessPool(invoker.pickled, invoker.processes, invoker.name)
        self.pool.start()  # HandlerRefused when they cannot load the handler
        super().__init__(steps, invoker, limit)
        self._invoke = functools.partial(invoker.invoke_in, self.pool)

    def cancel(self, states: Iterable[PartitionState]) -> None:
        """Kill the worker processes still running a Work of these (revoked) assignments: the Works queued
        behind it go to the other processes, and the process is replaced."""
        wanted = set(states)  # identity-hashed: see AsyncRunner.cancel
        if wanted:
            self.pool.terminate(wanted.__contains__, "stopped: its partition was revoked and it ran past "
                                "REVOKE_TIMEOUT")

    def shutdown(self, wait: bool) -> None:
        """Stop the worker processes (killing those still running: the engine waited SHUTDOWN_TIMEOUT) and
        reap them; every waiting shift gets its answer, so the threads end too."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.pool.close()
        if wait:
            self._executor.shutdown(wait=True)
