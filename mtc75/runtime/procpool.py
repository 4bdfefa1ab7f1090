"""The worker processes of ``RUNNER = "processes"``: a small pool, one socket pair and one thread per process.

Each *slot* owns one worker process (mtc75/runtime/procworker.py) at a time: its thread starts it, reads
its replies, and when it dies starts another. A call is one Work's messages (one partition's,
mtc75/core/work.py), sent whole and answered whole. A call goes to a free process; the others wait here, in
order, and the slot's thread hands the next one on the moment a reply arrives, before it wakes the caller.

*Sent ahead*: while the calls are short (the last took under AHEAD_CALL_SECONDS) and every process is busy, a
small call (up to AHEAD_BYTES) is sent to a process that runs one, which then reads it the moment it replies
instead of idling for the round trip to this process (on a 1 ms handler that round trip was ~10 % of each
message). Such a call has a *lease* (AHEAD_LEASE): the process runs it only if it reads it before then, and
once the lease is over with nothing to read from the process (so it has not finished the call before, and
will refuse this one), the slot's thread takes it back and gives it to the next free process. So a call
never waits behind a slow or hung one for longer than the lease, and never runs twice. A process holds
two calls at most. The slot, its process and the lease rule: mtc75/runtime/procslot.py.

Faults, per process (unlike ``concurrent.futures.ProcessPoolExecutor``, which breaks as a whole on one
death): a process that dies (kill -9, a segfault in a C extension, ``os._exit``) fails the one call it was
running (``Reply.lost``: :class:`WorkerLost`, retried like any failure; one sent ahead to it goes to the next
process, not run yet) and is replaced. A replacement that cannot load the handler fails the calls that wait
while no process is up, and is tried again after a growing pause. :meth:`ProcessPool.start` refuses
(HandlerRefused) a handler that the first processes cannot load, before anything else starts. A waiting call
whose ``wanted()`` turns False (its partition revoked) is answered lost (:class:`NotStartedError`) without
running. :meth:`ProcessPool.terminate` kills the processes whose running call a predicate picks (a revoke
past its REVOKE_TIMEOUT; a call sent ahead is not running: it is taken back at its lease's end, then
answered lost as no longer wanted); :meth:`ProcessPool.close` ends idle processes with EOF and kills busy
ones, within ``STOP_TIMEOUT``, and reaps every one: no zombie. A process outliving the consumer (kill -9 of the
consumer itself) is killed by the kernel or exits on its own: see procworker.

Threads: ``start``, ``terminate`` and ``close`` from the poll thread; ``call`` from the runner's worker
threads, any number at once (it blocks until the reply). Each slot's thread alone reads its socket and
starts, reaps and replaces its process -- the thread that started a process must outlive it
(``PR_SET_PDEATHSIG`` fires when that thread ends). ``_lock`` guards the waiting calls and which process
holds a call; a slot's ``lock`` guards its process, socket and ``live``. Lock order: ``_lock``, then a
slot's ``lock``.
"""

from __future__ import annotations

import logging
import pickle
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from mtc75.errors import HandlerRefused
from mtc75.runtime.procslot import (
    AHEAD_CALL_SECONDS,
    AHEAD_LEASE,
    READY_TIMEOUT,
    STOP_TIMEOUT,
    TAKEN_BACK,
    Call,
    NotStartedError,
    Slot,
    WorkerLost,
    describe_exit,
    end_writes,
    kill,
    readable,
)
from mtc75.runtime.procworker import PROTOCOL, REFUSED, Reply, pack, read_failure

logger = logging.getLogger(__name__)

RESTART_PAUSE = (0.5, 10.0)  # the pause before another try after a replacement failed to start; doubles
# How often a call waiting for a process checks whether it is still wanted (its partition not revoked):
# a revoke then ends within this of its last running handler, and the waiting threads wake rarely.
GIVE_UP_CHECK = 0.25


class ProcessPool:
    """``count`` worker processes running the handler pickled in ``handler`` (see the module notes)."""

    def __init__(self, handler: bytes, count: int, name: str) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.name = name
        self._init = pickle.dumps((list(sys.path), handler, name, _log_level()), PROTOCOL)
        self._slots = [Slot(i) for i in range(count)]
        self._lock = threading.Lock()
        self._waiting: deque[Call] = deque()  # calls waiting for a process, in arrival order
        self._closing = threading.Event()
        self._broken: str | None = None  # why no process could be started lately, or None
        self._started = threading.Semaphore(0)  # one release per slot's first start, good or bad
        self._refusal: str | None = None  # why a first start failed
        self.deaths = 0  # processes that died unasked (each replaced); written by the slots' threads
        self._short = False  # the last call took under AHEAD_CALL_SECONDS: calls may be sent ahead
        self.terminated = 0  # processes killed by terminate() or close() while running a call (poll thread)

    @property
    def count(self) -> int:
        return len(self._slots)

    @property
    def pids(self) -> list[int]:
        """The worker processes up now."""
        return [s.proc.pid for s in self._slots if s.live and s.proc is not None]

    # -- the poll thread ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every process; HandlerRefused (all stopped again) when any cannot load the handler."""
        for slot in self._slots:
            slot.thread = threading.Thread(target=self._run, args=(slot,), name=f"mtc75-process-{slot.index}",
                                           daemon=True)
            slot.thread.start()
        deadline = time.monotonic() + READY_TIMEOUT + STOP_TIMEOUT
        for _ in self._slots:
            if not self._started.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self._refusal = self._refusal or f"no worker process was ready within {READY_TIMEOUT:.0f}s"
                break
        if self._refusal is not None:
            self.close()
            raise HandlerRefused(f"handler {self.name} cannot run in a worker process (RUNNER=processes): "
                                 f"{self._refusal}")
        logger.info("%d worker processes run handler %s (pids %s)", self.count, self.name,
                    ", ".join(map(str, self.pids)))

    def terminate(self, chosen: Callable[[object], bool], reason: str) -> int:
        """Kill the processes whose running call's tag is ``chosen`` (that call is lost with ``reason``) and
        answer the waiting calls no longer wanted. Returns how many processes were killed."""
        killed = 0
        with self._lock:
            self._drop_unwanted()
            for slot in self._slots:
                call = slot.calls[0] if slot.calls else None  # one sent ahead is taken back at its lease's end
                if call is not None and call is not TAKEN_BACK and chosen(call.tag):
                    with slot.lock:
                        if slot.live and slot.proc is not None:
                            slot.live = False  # nothing more is handed to it
                            slot.stop_reason = reason
                            kill(slot.proc)
                            killed += 1
        self.terminated += killed
        return killed

    def close(self) -> None:
        """Stop: idle processes get EOF, busy ones (past the caller's deadline) are killed; every process is
        reaped, every call answered (lost), within about ``STOP_TIMEOUT``."""
        self._closing.set()
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            busy = {slot.index for slot in self._slots if any(call is not TAKEN_BACK for call in slot.calls)}
        for call in waiting:
            call.lose(WorkerLost("not run: the consumer is stopping its worker processes"))
        with self._lock:
            for slot in self._slots:
                with slot.lock:
                    slot.live = False
                    if slot.proc is None:
                        continue
                    if slot.index in busy:
                        slot.stop_reason = "abandoned: the consumer stopped while it ran (SHUTDOWN_TIMEOUT)"
                        kill(slot.proc)
                        self.terminated += 1
                    elif slot.conn is not None:
                        end_writes(slot.conn)  # EOF: the worker exits on its own
        deadline = time.monotonic() + STOP_TIMEOUT
        for slot in self._slots:
            if slot.thread is not None and slot.thread is not threading.current_thread():
                slot.thread.join(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            thread = slot.thread
            if thread is not None and thread.is_alive() and thread is not threading.current_thread():
                with slot.lock:
                    if slot.proc is not None:
                        kill(slot.proc)
                thread.join(STOP_TIMEOUT)
                if thread.is_alive():
                    logger.warning("worker process slot %d did not stop within %.0fs", slot.index, 2 * STOP_TIMEOUT)

    # -- the runner's worker threads ------------------------------------------------------------------

    def call(self, messages: Sequence[Any], timed: bool, tag: object, wanted: Callable[[], bool]) -> Reply:
        """Run one partition's ``messages`` in a free process (waiting for one) and return its reply."""
        call = Call(pickle.dumps((*pack(messages), timed), PROTOCOL), tag, wanted)
        self._submit(call)
        while not call.wait(GIVE_UP_CHECK):
            if not wanted():
                with self._lock:
                    self._drop_unwanted()
        assert call.reply is not None
        return call.reply

    def _submit(self, call: Call) -> None:
        """Send ``call`` to a free process, or queue it for the next one; or answer it lost."""
        while True:
            with self._lock:
                if self._closing.is_set():
                    call.lose(WorkerLost("not run: the consumer is stopping its worker processes"))
                    return
                if not call.wanted():
                    call.lose(NotStartedError("its partition was revoked before it started"))
                    return
                slot = self._slot_for(call)
                if slot is None:
                    if self._broken is not None and not any(s.live for s in self._slots):
                        call.lose(WorkerLost(f"no worker process is up: {self._broken}"))
                    else:
                        self._waiting.append(call)
                    return
                slot.calls.append(call)
                slot.lock.acquire()  # before _lock is let go: the lock order (and that of the sends)
            if slot.send(call):
                return
            with self._lock:  # it died between the choice and the send: choose again
                slot.discard(call)

    def _slot_for(self, call: Call) -> Slot | None:
        """Caller holds ``_lock``. A free process's slot, else one to send ``call`` ahead to, else None."""
        ahead: Slot | None = None
        for slot in self._slots:
            if not slot.live:
                continue
            if not slot.calls:
                call.lease = 0.0
                return slot
            if ahead is None and slot.takes_ahead(call, self._short):
                ahead = slot
        if ahead is not None:
            call.lease = time.monotonic() + AHEAD_LEASE
        return ahead

    def _hand_on(self, slot: Slot, ended: list[Call | None] | None = None) -> None:
        """Send ``slot``'s process the first waiting calls still wanted, as many as it may take now (one, and
        one ahead). With ``ended``: first, in the same step, take the call it ran off the slot (into ``ended[0]``)."""
        with self._lock:
            if ended is not None:
                ended[0] = slot.calls.popleft() if slot.calls else None
            call = self._next_for(slot)
        while call is not None:
            if not slot.send(call):
                with self._lock:  # it is no longer up: the call waits for another process, first in line
                    slot.discard(call)
                    self._waiting.appendleft(call)
                return
            with self._lock:
                call = self._next_for(slot)  # a free process gets one call now, and may get one ahead

    def _next_for(self, slot: Slot) -> Call | None:
        """Caller holds ``_lock``. The first waiting call still wanted, now the slot's (``slot.lock`` taken for
        the send), if the slot's process may take it now (free, or as a call sent ahead); else None."""
        waiting = self._waiting
        if not slot.live:
            return None
        while waiting:
            call = waiting[0]
            if not call.wanted():
                waiting.popleft()
                call.lose(NotStartedError("its partition was revoked before it started"))
                continue
            if not slot.calls:
                call.lease = 0.0
            elif slot.takes_ahead(call, self._short):
                call.lease = time.monotonic() + AHEAD_LEASE
            else:
                return None
            waiting.popleft()
            slot.calls.append(call)
            slot.lock.acquire()
            return call
        return None

    def _drop_unwanted(self) -> None:
        """Caller holds ``_lock``. Answer the waiting calls no longer wanted (lost, never run)."""
        if any(not c.wanted() for c in self._waiting):
            keep = deque()
            for call in self._waiting:
                if call.wanted():
                    keep.append(call)
                else:
                    call.lose(NotStartedError("its partition was revoked before it started"))
            self._waiting = keep

    # -- a slot's thread ------------------------------------------------------------------------------

    def _run(self, slot: Slot) -> None:
        """Start the slot's process, serve it, replace it when it dies; until close()."""
        first = True
        pause = RESTART_PAUSE[0]
        while not self._closing.is_set():
            refusal = slot.launch(self._init, self._closing)
            if refusal is not None:
                if first:
                    self._refusal = self._refusal or refusal
                    self._started.release()
                    return
                if self._closing.is_set():
                    return
                logger.error("could not start a worker process for handler %s: %s; trying again in %.1fs",
                             self.name, refusal, pause)
                self._broke(refusal)
                if self._closing.wait(pause):
                    return
                pause = min(RESTART_PAUSE[1], 2 * pause)
                continue
            if first:
                first = False
                self._started.release()
            else:
                logger.info("worker process %d started for handler %s", slot.proc.pid if slot.proc else 0, self.name)
            pause = RESTART_PAUSE[0]
            with self._lock:
                self._broken = None
            self._hand_on(slot)
            self._serve(slot)
            self._bury(slot)

    def _serve(self, slot: Slot) -> None:
        """Answer the slot's calls until its process's socket closes: hand the next waiting call on first,
        then wake the caller of the one that ended; take back a call sent ahead once its lease has ended."""
        conn = slot.conn
        assert conn is not None
        recv, loads, fd = conn.recv_bytes, pickle.loads, conn.fileno()
        hand_on = self._hand_on
        ended: list[Call | None] = [None]
        while True:
            try:
                with self._lock:
                    wait = slot.lease_left()
                if not readable(fd, wait):
                    with self._lock:
                        back = slot.take_back(fd)  # if a lease ended meanwhile
                    if back is not None:
                        self._again([back])
                    continue
                data = recv()
            except (EOFError, OSError):
                return
            try:
                handled, seconds, failures, calls, outputs = loads(data)
                if failures:
                    failures = [(index, read_failure(blob, name, text, tb))
                                for index, blob, name, text, tb in failures]
            except Exception:  # a reply that makes no sense: this process cannot be trusted with more
                logger.exception("worker process %d of handler %s sent a reply that cannot be read; stopping it",
                                  slot.proc.pid if slot.proc else 0, self.name)
                with slot.lock:
                    if slot.proc is not None:
                        kill(slot.proc)
                return
            if handled == REFUSED:  # a call sent ahead, read after its lease: not run
                with self._lock:
                    back = slot.refused()
                if back is not None:
                    self._again([back])
                continue
            self._short = seconds < AHEAD_CALL_SECONDS
            hand_on(slot, ended)
            call = ended[0]
            if call is not None and call is not TAKEN_BACK:
                call.finish(Reply(handled, seconds, failures, calls, outputs=outputs))

    def _bury(self, slot: Slot) -> None:
        """The slot's process ended: reap it; the call it was running is lost, one sent ahead goes on."""
        with self._lock, slot.lock:
            slot.live = False
            held = [c for c in slot.calls if c is not TAKEN_BACK]
            slot.calls.clear()
            call = held[0] if held else None
            reason, slot.stop_reason = slot.stop_reason, None
        proc = slot.proc
        pid = proc.pid if proc is not None else 0
        code = slot.reap()
        if reason is None and not self._closing.is_set():
            self.deaths += 1
            logger.warning("worker process %d of handler %s %s%s; starting another", pid, self.name,
                           describe_exit(code), " while running a message" if call is not None else "")
        if call is not None:
            call.lose(WorkerLost(reason or f"its worker process {pid} {describe_exit(code)} while running it"))
        if len(held) > 1:
            self._again(held[1:])  # sent ahead, never run

    def _again(self, calls: list[Call]) -> None:
        """Calls not run after all: first in line again (lost, when the pool closes), for any free process."""
        with self._lock:
            if self._closing.is_set():
                for call in calls:
                    call.lose(WorkerLost("not run: the consumer is stopping its worker processes"))
                return
            self._waiting.extendleft(reversed(calls))
        for slot in self._slots:
            with self._lock:
                free = slot.live and not slot.calls
            if free:
                self._hand_on(slot)

    def _broke(self, refusal: str) -> None:
        """No process could be started: while none is up, the waiting calls are answered lost."""
        with self._lock:
            self._broken = refusal
            if any(s.live for s in self._slots):
                return
            waiting = list(self._waiting)
            self._waiting.clear()
        for call in waiting:
            call.lose(WorkerLost(f"no worker process is up: {refusal}"))

def _log_level() -> int | None:
    """The level worker processes log at: the consumer's, when its program set logging up (else theirs stay
    Python's default: warnings to stderr)."""
    root = logging.getLogger()
    return root.getEffectiveLevel() if root.handlers else None
