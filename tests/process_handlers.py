"""Handlers for the process runner's tests: they run in worker processes, so they share no memory with the
test. Each message says what to do (its value, JSON: ``{"do": ...}``), and each call appends lines to the
journal named by ``MTC75_TEST_JOURNAL`` (one ``O_APPEND`` write per line: whole lines from every process).

``ms``: first spin that many milliseconds of pure-Python CPU. ``do``: ``"ok"`` (default), ``"fail"`` (raise
ValueError), ``"odd-error"`` (raise an error that cannot be rebuilt from its pickle), ``"hang"`` (until the file
``MTC75_TEST_RELEASE`` exists), and, on the first call only (a marker file under ``MTC75_TEST_ONCE``):
``"kill"`` (SIGKILL itself), ``"exit"`` (``os._exit(3)``), ``"segv"`` (read address 0), ``"fail-once"``;
``"kill-always"`` on every call.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

JOURNAL = "MTC75_TEST_JOURNAL"
RELEASE = "MTC75_TEST_RELEASE"
ONCE = "MTC75_TEST_ONCE"


def note(event: str, message: Any, extra: str = "") -> None:
    path = os.environ.get(JOURNAL)
    if not path:
        return
    line = f"{event} {os.getpid()} {message.partition()} {message.offset()} {time.monotonic():.6f} {extra}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def first_time(message: Any) -> bool:
    """True on the first call for this message (across processes and attempts)."""
    marker = Path(os.environ[ONCE]) / f"{message.partition()}-{message.offset()}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class OddError(Exception):
    """Pickles (its args), but cannot be rebuilt: ``__init__`` wants two arguments."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"odd {code}: {text}")


def spin(ms: float) -> int:
    """Pure-Python CPU work for about ``ms`` milliseconds of one core (holds the GIL)."""
    end = time.thread_time() + ms / 1000.0
    n = 0
    while time.thread_time() < end:
        for i in range(200):
            n += i * i % 7
    return n


def handle(message: Any) -> None:
    order = json.loads(message.value() or b"{}")
    do = order.get("do", "ok")
    note("start", message)
    if "ms" in order:
        spin(float(order["ms"]))
    if do == "fail":
        raise ValueError(f"fails at {message.partition()}@{message.offset()}")
    if do == "odd-error":
        raise OddError(7, "cannot be rebuilt")
    if do == "fail-once" and first_time(message):
        raise ValueError("first attempt fails")
    if do == "hang":
        while not os.path.exists(os.environ[RELEASE]):
            time.sleep(0.01)
    if do == "kill-always":
        os.kill(os.getpid(), signal.SIGKILL)
    if do in ("kill", "exit", "segv") and first_time(message):
        sys.stdout.flush()
        if do == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif do == "exit":
            os._exit(3)
        else:
            ctypes.string_at(0)  # a segfault, as a C extension's bug would be
    note("done", message)


def echo(message: Any) -> None:
    """Journal every accessor of the message, as repr, on one line."""
    fields = (message.topic(), message.partition(), message.offset(), message.key(), message.value(),
              message.headers(), message.timestamp(), message.error(), len(message), type(message).__name__)
    note("echo", message, repr(fields).replace("\n", " "))


def spin_handler(message: Any) -> None:
    """The bench's CPU-bound handler: ``ms`` of pure-Python CPU from the value (default 2)."""
    order = json.loads(message.value() or b"{}")
    spin(float(order.get("ms", 2)))


def noop(_message: Any) -> None:
    """Nothing: the fast path's chunks."""


class _LoadsOnlyInTheConsumer:
    """A handler whose pickle names a module that only the worker cannot import."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __call__(self, message: Any) -> None:
        pass

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.how == "import":
            return importlib.import_module, ("tests.no_such_module_for_workers",)
        if self.how == "exit":
            return sys.exit, (4,)
        return os._exit, (9,)  # the worker process dies while loading


missing_module = _LoadsOnlyInTheConsumer("import")
exits_at_load = _LoadsOnlyInTheConsumer("exit")
dies_at_load = _LoadsOnlyInTheConsumer("die")
