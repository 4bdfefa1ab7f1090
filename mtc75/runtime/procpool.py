"""The worker processes of ``RUNNER = "processes"``: a small pool, one socket pair and one thread per process.

Each *slot* owns one worker process (mtc75/runtime/procworker.py) at a time: its thread starts it, reads
its replies, and when it dies starts another. A call is one Work's messages (one partition's,
mtc75/core/work.py), sent whole and answered whole. A process holds one call at a time; the others wait
here, in order, and the slot's thread hands the next one to its process the moment a reply arrives, before
it wakes the caller: no round trip through the caller's thread, and no message ever waits in a pipe
behind a slow one while another process is free.

Faults, per process (unlike ``concurrent.futures.ProcessPoolExecutor``, which breaks as a whole on one
death): a process that dies (kill -9, a segfault in a C extension, ``os._exit``) fails the one call it was
running (``Reply.lost``: :class:`WorkerLost`, retried like any failure) and is replaced. A replacement that
cannot load the handler fails the calls that wait while no process is up, and is tried again after a
growing pause. :meth:`ProcessPool.start` refuses (HandlerRefused) a handler that the first processes
cannot load, before anything else starts. A waiting call whose ``wanted()`` turns False (its partition
revoked) is answered lost (:class:`NotStartedError`) without running. :meth:`ProcessPool.terminate` kills
the processes whose running call a predicate picks (a revoke past its REVOKE_TIMEOUT); :meth:`ProcessPool.close`
ends idle processes with EOF and kills busy ones, within ``STOP_TIMEOUT``, and reaps every one: no
zombie. A process outliving the consumer (kill -9 of the consumer itself) is killed by the kernel or
exits on its own: see procworker.

Threads: ``start``, ``terminate`` and ``close`` from the poll thread; ``call`` from the runner's worker
threads, any number at once (it blocks until the reply). Each slot's thread alone reads its socket and
starts, reaps and replaces its process -- the thread that started a process must outlive it
(``PR_SET_PDEATHSIG`` fires when that thread ends). ``_lock`` guards the waiting calls and which process
holds a call; a slot's ``lock`` guards its process, socket and ``live``. Lock order: ``_lock``, then a
slot's ``lock``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mtc75.errors import HandlerRefused
from mtc75.runtime.procworker import BOOT, PROTOCOL, Reply, pack, read_failure

logger = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds a new process may take to load the handler (its imports) before it is refused
STOP_TIMEOUT = 2.0  # seconds close() gives the processes to exit after EOF before it kills them
RESTART_PAUSE = (0.5, 10.0)  # the pause before another try after a replacement failed to start; doubles
# How often a call waiting for a process checks whether it is still wanted (its partition not revoked):
# a revoke then ends within this of its last running handler, and the waiting threads wake rarely.
GIVE_UP_CHECK = 0.25
ROOT = str(Path(__file__).resolve().parent.parent.parent)  # the directory that holds the mtc75 package


class WorkerLost(Exception):
    """The worker process running this message died, or was stopped (revoke, shutdown) before it finished."""


class NotStartedError(WorkerLost):
    """Given up (its partition revoked) while it waited for a worker process: never sent, never run."""


def describe_exit(code: int | None) -> str:
    """``"killed by SIGKILL"``, ``"exited with code 3"``."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class _Call:
    """One call: its pickled messages, its owner, and the reply its caller waits for (set exactly once)."""

    __slots__ = ("_done", "payload", "reply", "tag", "wanted")

    def __init__(self, payload: bytes, tag: object, wanted: Callable[[], bool]) -> None:
        self.payload = payload
        self.tag = tag
        self.wanted = wanted
        self.reply: Reply | None = None
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self, reply: Reply) -> None:
        self.reply = reply
        self._done.release()

    def lose(self, error: BaseException) -> None:
        self.finish(Reply(0, 0.0, [], None, error))

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=timeout)


class _Slot:
    """One worker process at a time, and the thread that owns it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()  # proc, conn, live, stop_reason, and the socket's writes
        self.call: _Call | None = None  # the call its process runs (under the pool's lock)
        self.live = False  # a process is up and takes calls
        self.conn: Connection | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_reason: str | None = None  # set before the pool kills the process: what its call gets
        self.thread: threading.Thread | None = None


class ProcessPool:
    """``count`` worker processes running the handler pickled in ``handler`` (see the module notes)."""

    def __init__(self, handler: bytes, count: int, name: str) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.name = name
        self._init = pickle.dumps((list(sys.path), handler, name, _log_level()), PROTOCOL)
        self._slots = [_Slot(i) for i in range(count)]
        self._lock = threading.Lock()
        self._waiting: deque[_Call] = deque()  # calls waiting for a process, in arrival order
        self._closing = threading.Event()
        self._broken: str | None = None  # why no process could be started lately, or None
        self._started = threading.Semaphore(0)  # one release per slot's first start, good or bad
        self._refusal: str | None = None  # why a first start failed
        self.deaths = 0  # processes that died unasked (each replaced); written by the slots' threads
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
                call = slot.call
                if call is not None and chosen(call.tag):
                    with slot.lock:
                        if slot.live and slot.proc is not None:
                            slot.live = False  # nothing more is handed to it
                            slot.stop_reason = reason
                            _kill(slot.proc)
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
            busy = {slot.index for slot in self._slots if slot.call is not None}
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
                        _kill(slot.proc)
                        self.terminated += 1
                    elif slot.conn is not None:
                        _end_writes(slot.conn)  # EOF: the worker exits on its own
        deadline = time.monotonic() + STOP_TIMEOUT
        for slot in self._slots:
            if slot.thread is not None and slot.thread is not threading.current_thread():
                slot.thread.join(max(0.0, deadline - time.monotonic()))
        for slot in self._slots:
            thread = slot.thread
            if thread is not None and thread.is_alive() and thread is not threading.current_thread():
                with slot.lock:
                    if slot.proc is not None:
                        _kill(slot.proc)
                thread.join(STOP_TIMEOUT)
                if thread.is_alive():
                    logger.warning("worker process slot %d did not stop within %.0fs", slot.index, 2 * STOP_TIMEOUT)

    # -- the runner's worker threads ------------------------------------------------------------------

    def call(self, messages: Sequence[Any], timed: bool, tag: object, wanted: Callable[[], bool]) -> Reply:
        """Run one partition's ``messages`` in a free process (waiting for one) and return its reply."""
        call = _Call(pickle.dumps((*pack(messages), timed), PROTOCOL), tag, wanted)
        self._submit(call)
        while not call.wait(GIVE_UP_CHECK):
            if not wanted():
                with self._lock:
                    self._drop_unwanted()
        assert call.reply is not None
        return call.reply

    def _submit(self, call: _Call) -> None:
        """Send ``call`` to a free process, or queue it for the next one; or answer it lost."""
        while True:
            with self._lock:
                if self._closing.is_set():
                    call.lose(WorkerLost("not run: the consumer is stopping its worker processes"))
                    return
                if not call.wanted():
                    call.lose(NotStartedError("its partition was revoked before it started"))
                    return
                slot = next((s for s in self._slots if s.live and s.call is None), None)
                if slot is None:
                    if self._broken is not None and not any(s.live for s in self._slots):
                        call.lose(WorkerLost(f"no worker process is up: {self._broken}"))
                    else:
                        self._waiting.append(call)
                    return
                slot.call = call
                slot.lock.acquire()  # before _lock is let go: the lock order
            if self._send(slot, call):
                return
            with self._lock:  # it died between the choice and the send: choose again
                slot.call = None

    def _send(self, slot: _Slot, call: _Call) -> bool:
        """Caller holds ``slot.lock`` (released here). Write the call to the slot's process; False when it
        is no longer up."""
        try:
            if not slot.live or slot.conn is None:
                return False
            try:
                slot.conn.send_bytes(call.payload)
            except OSError:
                pass  # the process died: its thread answers the call it held
            return True
        finally:
            slot.lock.release()

    def _hand_on(self, slot: _Slot, ended: list[_Call | None] | None = None) -> None:
        """Send ``slot``'s free process the first waiting call still wanted, if any. With ``ended``: first,
        in the same step, free the slot of the call it ran and put that call in ``ended[0]``."""
        with self._lock:
            if ended is not None:
                ended[0], slot.call = slot.call, None
            call = self._next_for(slot)
        if call is not None and not self._send(slot, call):
            with self._lock:  # it is no longer up: the call waits for another process, first in line
                slot.call = None
                self._waiting.appendleft(call)

    def _next_for(self, slot: _Slot) -> _Call | None:
        """Caller holds ``_lock``; ``slot`` is free. The first waiting call still wanted, now the slot's
        (``slot.lock`` taken for the send), or None (also when the slot is no longer up)."""
        waiting = self._waiting
        if not slot.live or slot.call is not None:
            return None
        while waiting:
            call = waiting.popleft()
            if call.wanted():
                slot.call = call
                slot.lock.acquire()
                return call
            call.lose(NotStartedError("its partition was revoked before it started"))
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

    def _run(self, slot: _Slot) -> None:
        """Start the slot's process, serve it, replace it when it dies; until close()."""
        first = True
        pause = RESTART_PAUSE[0]
        while not self._closing.is_set():
            refusal = self._launch(slot)
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

    def _launch(self, slot: _Slot) -> str | None:
        """Start a process and wait until it has loaded the handler; None when it is up, else why not."""
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", BOOT.format(root=ROOT), str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            )
        except (OSError, ValueError) as err:
            ours.close()
            return f"cannot start {sys.executable!r}: {getattr(err, 'strerror', None) or err}"
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        with slot.lock:
            slot.proc, slot.conn = proc, conn
        refusal: str | None = None
        try:
            conn.send_bytes(self._init)
            deadline = time.monotonic() + READY_TIMEOUT
            while not conn.poll(0.1):
                if self._closing.is_set():
                    refusal = "the consumer stopped while it started"
                    break
                if time.monotonic() >= deadline:
                    refusal = f"did not load the handler within {READY_TIMEOUT:.0f}s"
                    break
            else:
                answer, detail = pickle.loads(conn.recv_bytes())
                if answer != "ready":
                    refusal = str(detail)
        except (EOFError, OSError):  # it died while loading: its exit status says how
            try:
                code = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            refusal = f"its worker process {describe_exit(code)} while loading it"
        if refusal is None:
            with slot.lock:
                slot.live = True
            return None
        self._reap(slot)
        return refusal

    def _serve(self, slot: _Slot) -> None:
        """Answer the slot's calls until its process's socket closes: hand the next waiting call on first,
        then wake the caller of the one that ended."""
        conn = slot.conn
        assert conn is not None
        recv, loads = conn.recv_bytes, pickle.loads
        hand_on = self._hand_on
        ended: list[_Call | None] = [None]
        while True:
            try:
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
                        _kill(slot.proc)
                return
            hand_on(slot, ended)
            call = ended[0]
            if call is not None:
                call.finish(Reply(handled, seconds, failures, calls, outputs=outputs))

    def _bury(self, slot: _Slot) -> None:
        """The slot's process ended: reap it; the call it was running is lost."""
        with self._lock, slot.lock:
            slot.live = False
            call, slot.call = slot.call, None
            reason, slot.stop_reason = slot.stop_reason, None
        proc = slot.proc
        pid = proc.pid if proc is not None else 0
        code = self._reap(slot)
        if reason is None and not self._closing.is_set():
            self.deaths += 1
            logger.warning("worker process %d of handler %s %s%s; starting another", pid, self.name,
                           describe_exit(code), " while running a message" if call is not None else "")
        if call is not None:
            call.lose(WorkerLost(reason or f"its worker process {pid} {describe_exit(code)} while running it"))

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

    def _reap(self, slot: _Slot) -> int | None:
        """Wait for the slot's process to end (killing it after STOP_TIMEOUT) and close its socket."""
        with slot.lock:
            proc, conn = slot.proc, slot.conn
            slot.proc, slot.conn = None, None
        code: int | None = None
        if proc is not None:
            try:
                code = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill(proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(STOP_TIMEOUT)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        return code


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()


def _end_writes(conn: Connection) -> None:
    """EOF for the worker: shut the socket's sending side (the reading side stays with its slot's thread)."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.shutdown(socket.SHUT_WR)
        finally:
            sock.close()


def _log_level() -> int | None:
    """The level worker processes log at: the consumer's, when its program set logging up (else theirs stay
    Python's default: warnings to stderr)."""
    root = logging.getLogger()
    return root.getEffectiveLevel() if root.handlers else None
