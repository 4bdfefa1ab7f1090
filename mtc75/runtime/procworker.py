"""A worker process of ``RUNNER = "processes"``: loads the handler once, then runs the messages it is sent.

Started by :mod:`mtc75.runtime.procpool` as ``python -c BOOT <fd> <parent pid>``, with one end of a socket
pair as ``fd`` (framed by :class:`multiprocessing.connection.Connection`). What crosses it:

* parent -> worker, first: ``(sys.path, pickled handler and kind, handler name, log level)`` (the kind: a
  batch handler or not, and how to build the decode function of the deserializers); the worker answers
  ``("ready", pid)`` once the handler is unpickled (its module imported) and accepted by an
  :class:`~mtc75.runtime.invoker.Invoker`, else ``("refused", "why")`` and exits.
* then per call: a lease (8 bytes, ``LEASE``: a ``time.monotonic()`` instant, 0.0 for none) and the pickled
  ``(topic, partition, [(offset, key, value, headers, timestamp), ...], timed)`` -- one Work's messages,
  which are one partition's (mtc75/core/work.py). A call sent ahead while this process ran another has a
  lease: read after it, it is not run and the answer is ``REFUSED`` (its sender may have taken it back to
  give to another process: mtc75/runtime/procpool.py). Otherwise the answer is
  ``(handled, seconds, failures, calls, outputs)``: how many messages the handler saw (a chunk is cut after
  ``CHUNK_SECONDS`` as in a thread), their handler seconds, ``(index, pickled error or None, type name,
  text, traceback)`` per message that raised (index ``WHOLE`` for a batch that failed as a whole), and
  ``(seconds, cpu)`` per call when ``timed``, and the output records returned, ``(index, Output)``.
* EOF from the parent: exit 0.

The handler is called by this process's own Invoker, so a failure here is what it is in a thread:
any ``BaseException``, a returned awaitable. Its message is a :class:`PlainMessage`. An error that does
not survive pickling both ways is sent as its type name and text (:func:`wire_failure`).

The parent going away, however it goes: ``PR_SET_PDEATHSIG`` (SIGKILL when the thread that started this
process ends, Linux), a watch of ``getppid()`` once a second (every platform), EOF on the socket.
SIGINT and SIGTERM are ignored: Ctrl-C reaches the whole process group, and the consumer drains its
in-flight messages before it stops its workers (SIGKILL past its deadline).

Threads: the main thread does everything; one daemon thread watches the parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

# The child's command: puts this checkout first on sys.path (the full path of the parent follows in INIT),
# then serves. ``{root}`` is filled in by the pool.
BOOT = "import sys; sys.path.insert(0, {root!r}); from mtc75.runtime.procworker import main; main()"
PARENT_CHECK = 1.0  # seconds between two getppid() checks
ORPHANED = 70  # exit code of a worker that found its parent gone
PR_SET_PDEATHSIG = 1
PROTOCOL = pickle.HIGHEST_PROTOCOL
WHOLE = -1  # the index of a failure of a whole batch (a batch handler's raise that names no message)
LEASE = struct.Struct("!d")  # the lease before each call's pickle (see the module notes)
REFUSED = -1  # ``handled`` of the answer to a call read after its lease: not run

WireMessage = tuple[int, Any, Any, Any, Any]  # offset, key, value, headers, timestamp


class PlainMessage:
    """What a handler gets in a worker process: a picklable stand-in for ``confluent_kafka.Message`` with
    its accessors (``topic()``, ``partition()``, ``offset()``, ``key()``, ``value()``, ``headers()``,
    ``timestamp()``; ``error()`` is always None: errors never reach a handler)."""

    __slots__ = ("_headers", "_key", "_offset", "_partition", "_timestamp", "_topic", "_value")

    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None = None,
                 value: bytes | None = None, headers: list[tuple[str, bytes]] | None = None,
                 timestamp: tuple[int, int] = (0, 0)) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._key = key
        self._value = value
        self._headers = headers
        self._timestamp = timestamp

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return self._timestamp

    def error(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._value) if self._value is not None else 0

    def __reduce__(self) -> tuple[type[PlainMessage], tuple[Any, ...]]:
        return PlainMessage, (self._topic, self._partition, self._offset, self._key, self._value, self._headers,
                              self._timestamp)

    def __repr__(self) -> str:
        return f"PlainMessage({self._topic}[{self._partition}]@{self._offset})"


def pack(messages: Sequence[Any]) -> tuple[str, int, list[WireMessage]]:
    """One partition's messages (any object with the Message accessors) as the wire's plain tuples."""
    head = messages[0]
    return head.topic(), head.partition(), [
        (m.offset(), m.key(), m.value(), m.headers(), m.timestamp()) for m in messages
    ]


def unpack(topic: str, partition: int, rows: list[WireMessage]) -> list[PlainMessage]:
    return [PlainMessage(topic, partition, *row) for row in rows]


class Reply(NamedTuple):
    """A call's answer, in the consumer: what the worker said, or ``lost`` (the process died running it)."""

    handled: int  # messages the handler saw, in order (a chunk may be cut short)
    seconds: float  # their handler time, measured in the worker
    failures: list[tuple[int, BaseException]]  # (index, error) per message that raised
    calls: list[tuple[float, float | None]] | None  # (seconds, cpu) per call, when timed
    lost: BaseException | None = None  # the worker process died while this call was its running one
    outputs: list[tuple[int, Any]] | None = None  # (index, mtc75.Output) the handler returned to be written


class UnpicklableError(Exception):
    """A handler's error that could not cross from its worker process as itself (its class cannot be
    pickled or rebuilt): its type name and text. ``describe_error`` shows it under that type name."""

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(type_name, text)
        self.type_name = type_name
        self.text = text

    def __str__(self) -> str:
        return self.text


class RemoteTraceback(Exception):
    """The traceback of a handler's error in its worker process, as text: set as the error's ``__cause__``
    in the consumer, so a logged failure shows where in the handler it was raised."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


def safe_text(err: BaseException) -> str:
    """``str(err)``, never raising (a user's ``__str__`` may)."""
    try:
        text = str(err)
    except BaseException as inner:  # whatever __str__ raises, the failure is still reported
        return f"<str() failed: {type(inner).__name__}>"
    return text if isinstance(text, str) else repr(text)


def wire_failure(index: int, err: BaseException) -> tuple[int, bytes | None, str, str, str]:
    """``(index, pickled error, type name, text, traceback)``; the pickle is None when the error cannot
    make the round trip (checked here: a class whose ``__init__`` does not take its ``args`` back fails
    only when rebuilt)."""
    blob: bytes | None
    try:
        blob = pickle.dumps(err, PROTOCOL)
        pickle.loads(blob)
    except BaseException:  # any class of user code: pickling it may raise anything
        blob = None
    try:
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    except BaseException:
        tb = ""
    return index, blob, type(err).__name__, safe_text(err), tb


def read_failure(blob: bytes | None, type_name: str, text: str, tb: str) -> BaseException:
    """The error a worker sent, in this process: itself when it unpickles here, else an UnpicklableError."""
    err: BaseException | None = None
    if blob is not None:
        try:
            err = pickle.loads(blob)
        except BaseException:  # e.g. its module does not import in the consumer: the text is what is left
            err = None
        if not isinstance(err, BaseException):
            err = None
    if err is None:
        err = UnpicklableError(type_name, text)
    if tb:
        with contextlib.suppress(BaseException):  # a class with __slots__ or a read-only __cause__
            err.__cause__ = RemoteTraceback(tb)
    return err


# -- the worker process ----------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (Linux); a thread checks getppid() too."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # gone before prctl took effect
        os._exit(ORPHANED)

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK)
            if os.getppid() != parent:
                os._exit(ORPHANED)

    threading.Thread(target=watch, name="mtc75-parent-watch", daemon=True).start()


def _calls_recorder(calls: list[tuple[float, float | None]]) -> Any:
    class Recorder:
        wants_cpu = True

        def call_ended(self, seconds: float, cpu: float | None) -> None:
            calls.append((seconds, cpu))

    return Recorder()


def serve(conn: Connection) -> None:
    """Load the handler from INIT, then answer calls until EOF."""
    from mtc75.runtime.invoker import Invoker  # after sys.path is the parent's (INIT)

    try:
        path, blob, name, level = pickle.loads(conn.recv_bytes())
    except EOFError:
        return
    sys.path[:] = path
    if level is not None:
        logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)-7s [worker {os.getpid()}] %(message)s",
                            datefmt="%H:%M:%S")
    try:
        handler_blob, kind = pickle.loads(blob)
        handler = pickle.loads(handler_blob)
        batches, rebuild = pickle.loads(kind)  # a batch handler; how to build the decode function (None: none)
        decode = None if rebuild is None else rebuild[0](*rebuild[1])
        invoker = Invoker(handler, name=name, decode=decode, batches=batches)
    except BaseException as err:  # the import may raise anything, SystemExit included
        why = f"called sys.exit({err.code!r})" if isinstance(err, SystemExit) else \
            f"{type(err).__name__}: {safe_text(err)}"
        conn.send_bytes(pickle.dumps(("refused", why), PROTOCOL))
        return
    conn.send_bytes(pickle.dumps(("ready", os.getpid()), PROTOCOL))
    calls: list[tuple[float, float | None]] = []
    recorder = _calls_recorder(calls)
    timed = False
    run = invoker.run_messages
    recv, send, loads, dumps = conn.recv_bytes, conn.send_bytes, pickle.loads, pickle.dumps
    lease_of, monotonic = LEASE.unpack_from, time.monotonic
    refused = dumps((REFUSED, 0.0, [], None, None), PROTOCOL)
    from mtc75.runtime.invoker import Partial

    while True:
        try:
            data = recv()
        except (EOFError, OSError):
            return
        lease = lease_of(data)[0]
        if lease and monotonic() >= lease:  # sent ahead and read too late: its sender may have taken it back
            send(refused)
            continue
        topic, partition, rows, want_times = loads(memoryview(data)[LEASE.size:])
        if want_times != timed:
            timed = want_times
            (invoker.attach if timed else invoker.detach)(recorder)
        outcome, handled, seconds, outputs = run(unpack(topic, partition, rows))
        if outcome is None:
            failures: list[Any] = []
        elif isinstance(outcome, Partial):
            failures = [wire_failure(index, err) for index, err in outcome.failures]
        else:  # a single message's error, or a whole batch's
            failures = [wire_failure(WHOLE if invoker.batches else 0, outcome)]
        send(dumps((handled, seconds, failures, calls if timed else None, outputs), PROTOCOL))
        if timed:
            calls.clear()


def main() -> None:
    """The child's entry point: ``argv`` = [-c, fd, parent pid]."""
    fd, parent = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent)
    conn = Connection(fd)
    try:
        serve(conn)
    finally:
        with contextlib.suppress(OSError):
            conn.close()
    # a normal exit from here: the handler's atexit hooks run (the pool kills a worker that overruns)
