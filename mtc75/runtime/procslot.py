"""One slot of the process pool (mtc75/runtime/procpool.py): a worker process at a time, its socket, the calls
it holds, and the lease rule of a call sent ahead to it.

A call sent ahead (the pool's module notes) carries a *lease*, an instant of ``time.monotonic()`` (the same
clock in every process here): the worker runs it only if it reads it before then (mtc75/runtime/procworker.py).
The worker reads it only after it has answered the call before it, so once the lease has ended with nothing
to read from the worker, it cannot run it: the slot gives it back (:meth:`Slot.take_back`) and keeps a
``TAKEN_BACK`` in its place until the worker's REFUSED answer comes.

Threads: the pool's lock guards ``calls`` (every method here that reads it says so); ``lock`` guards the
process, the socket, ``live`` and ``stop_reason``, and is held for each write to the socket.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from mtc75.runtime.procworker import BOOT, LEASE, Reply

READY_TIMEOUT = 60.0  # seconds a new process may take to load the handler (its imports) before it is refused
STOP_TIMEOUT = 2.0  # seconds close() gives the processes to exit after EOF before it kills them
ROOT = str(Path(__file__).resolve().parent.parent.parent)  # the directory that holds the mtc75 package
# Sent ahead: only while the last call took less than AHEAD_CALL_SECONDS, only calls of at most AHEAD_BYTES
# (one waits whole in the socket's buffer: a larger one could fill it and block the slot's thread while its
# process blocks writing a reply to it), with a lease of AHEAD_LEASE seconds.
AHEAD_CALL_SECONDS = 0.05
AHEAD_BYTES = 65536
AHEAD_LEASE = 0.25
LEASE_MARGIN = 0.005  # the slot's thread looks this long after a lease ended


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


class Call:
    """One call: its pickled messages, its owner, and the reply its caller waits for (set exactly once)."""

    __slots__ = ("_done", "lease", "payload", "reply", "tag", "wanted")

    def __init__(self, payload: bytes, tag: object, wanted: Callable[[], bool]) -> None:
        self.payload = payload
        self.tag = tag
        self.wanted = wanted
        self.lease = 0.0  # sent ahead: the process runs it only if it reads it before this instant (monotonic)
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


def _never() -> bool:
    return False


TAKEN_BACK = Call(b"", None, _never)  # in a slot's calls: a call sent ahead, taken back, its refusal to come


class Slot:
    """One worker process at a time, and the thread that owns it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.lock = threading.Lock()  # proc, conn, live, stop_reason, and the socket's writes
        # The calls its process holds, in the order sent: the one it runs (or reads next) first, then one sent
        # ahead. A call taken back stays here as TAKEN_BACK until the process answers it REFUSED.
        self.calls: deque[Call] = deque()
        self.live = False  # a process is up and takes calls
        self.conn: Connection | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_reason: str | None = None  # set before the pool kills the process: what its call gets
        self.thread: threading.Thread | None = None

    # -- calls (the pool's lock held) -----------------------------------------------------------------

    def takes_ahead(self, call: Call, short: bool) -> bool:
        """May ``call`` be sent ahead to this slot's busy process (calls are ``short`` lately)?"""
        return short and len(self.calls) == 1 and len(call.payload) <= AHEAD_BYTES

    def lease_left(self) -> float:
        """Seconds the slot's thread may wait for its process before it looks at a call sent ahead: until its
        lease ends, or (none sent ahead yet: one may be sent while it waits) a lease's length."""
        calls = self.calls
        if len(calls) < 2 or calls[1] is TAKEN_BACK:
            return AHEAD_LEASE
        return max(0.0, calls[1].lease + LEASE_MARGIN - time.monotonic())

    def take_back(self, fd: int) -> Call | None:
        """The call sent ahead, if its lease has ended and nothing has come from the process since (it has not
        answered the call before: it will refuse this one); TAKEN_BACK in its place. Only the slot's thread
        reads ``fd``."""
        calls = self.calls
        if len(calls) < 2 or calls[1] is TAKEN_BACK or calls[1].lease > time.monotonic():
            return None
        if readable(fd, 0.0):  # looked at after the lease ended: an answer came first
            return None
        call, calls[1] = calls[1], TAKEN_BACK
        return call

    def refused(self) -> Call | None:
        """The process refused its first call (read after its lease): that call, unless taken back already."""
        call = self.calls.popleft() if self.calls else None
        return None if call is TAKEN_BACK else call

    def discard(self, call: Call) -> None:
        with contextlib.suppress(ValueError):
            self.calls.remove(call)

    # -- the process ----------------------------------------------------------------------------------

    def send(self, call: Call) -> bool:
        """Caller holds ``lock`` (released here). Write the call to the process; False when it is no longer up."""
        try:
            if not self.live or self.conn is None:
                return False
            try:
                self.conn.send_bytes(LEASE.pack(call.lease) + call.payload)
            except OSError:
                pass  # the process died: its thread answers the call it held
            return True
        finally:
            self.lock.release()

    def launch(self, init: bytes, closing: threading.Event) -> str | None:
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
        with self.lock:
            self.proc, self.conn = proc, conn
        refusal: str | None = None
        try:
            conn.send_bytes(init)
            deadline = time.monotonic() + READY_TIMEOUT
            while not conn.poll(0.1):
                if closing.is_set():
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
            with self.lock:
                self.live = True
            return None
        self.reap()
        return refusal

    def reap(self) -> int | None:
        """Wait for the process to end (killing it after STOP_TIMEOUT) and close its socket."""
        with self.lock:
            proc, conn = self.proc, self.conn
            self.proc, self.conn = None, None
        code: int | None = None
        if proc is not None:
            try:
                code = proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                kill(proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(STOP_TIMEOUT)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        return code


def readable(fd: int, timeout: float) -> bool:
    """Something (or EOF) can be read from ``fd`` within ``timeout`` seconds (poll: no FD_SETSIZE limit)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()


def end_writes(conn: Connection) -> None:
    """EOF for the worker: shut the socket's sending side (the reading side stays with its slot's thread)."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            sock.shutdown(socket.SHUT_WR)
        finally:
            sock.close()
