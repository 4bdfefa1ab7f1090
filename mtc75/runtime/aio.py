"""The event-loop thread for ``async def`` handlers: one dedicated thread running one asyncio loop.

An I/O-bound handler in a thread holds an OS thread (stack, GIL hand-offs) for every message in
flight; on an event loop a waiting message costs one task. :class:`EventLoopThread` owns that loop:
it starts it (uvloop when importable, plain asyncio otherwise), runs callbacks and coroutines handed
in from other threads, cancels tasks on request and stops it with a bounded join.

It also watches the loop for a handler that blocks it (``time.sleep``, a blocking client inside
``async def``): every coroutine in flight stalls while one does. A heartbeat on the loop measures its
lag (:class:`LoopLag`, pure); a watchdog thread samples the loop thread's stack 20 times a second. A
block is a lag over ``LAG_THRESHOLD`` during which one coroutine stayed on the stack in every sample
(:class:`StuckFrames`, pure): a loop merely overloaded (thousands of short callbacks, a starved CPU)
runs a different callback at each sample and is not blamed on a handler. Then one warning names the
handler and the line it blocked on, once per loop (a blocking handler blocks on every message).

Thread contract: ``start`` and ``stop`` are called by the owner (the poll thread) only; ``call_soon``,
``submit``, ``cancel`` and ``lag`` from any thread; tasks and the loop's state are touched only on the
loop thread (``cancel`` hands its work to it). The heartbeat writes ``_lag`` on the loop thread; the
watchdog thread reads it and alone owns ``_stuck`` and the warn-once flag.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

logger = logging.getLogger(__name__)

# A healthy but busy loop runs its heartbeat late by its own long turns: 1,000 coroutines going through
# 20,000 `await asyncio.sleep(0.1)` (AsyncRunner without a broker) delayed it by at most 0.10-0.14 s here
# (2 shared cores, load average 12-14). A lag alone is never blamed on a handler (StuckFrames); 0.25 s is
# past that worst healthy figure and still catches a 0.3 s blocking call.
LAG_THRESHOLD = 0.25
LAG_INTERVAL = 0.05  # seconds between heartbeats, and between watchdog looks: 20 wake-ups a second each
START_TIMEOUT = 5.0  # seconds the loop thread may take to start running its loop
MIN_SAMPLES = 3  # stack samples a coroutine must stay in before a lag is blamed on it
_COROUTINE_FLAGS = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR


class LoopError(RuntimeError):
    """The event loop is not running (not started, stopped, or it failed to start)."""


class LoopLag:
    """Lag of an event loop from its heartbeats (pure: the caller passes the time).

    The loop calls :meth:`beat` every ``interval``; any thread may ask :meth:`lag`, which is the
    longer of the last heartbeat's delay and how overdue the next one is now (a block in progress).
    """

    def __init__(self, interval: float, now: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = interval
        self._due = now + interval  # when the next heartbeat should run
        self.last = 0.0  # delay of the last heartbeat
        self.worst = 0.0  # largest delay seen (for figures)

    def beat(self, now: float) -> float:
        """A heartbeat ran at ``now``: returns its delay and schedules the next one."""
        late = max(0.0, now - self._due)
        self.last = late
        if late > self.worst:
            self.worst = late
        self._due = now + self.interval
        return late

    def lag(self, now: float) -> float:
        """Seconds the loop is behind: the last heartbeat's delay, or the current one's if longer."""
        return max(self.last, now - self._due)


class StuckFrames:
    """How long one coroutine frame has stayed on a thread's stack, from samples (pure: time passed in).

    ``sample`` gets the coroutine frames running at one moment; a frame missing from one sample starts
    over. A coroutine that blocks stays in every sample; on a busy loop each sample catches another of
    its many short steps. Frames are held (not their ids): a finished coroutine's frame memory is
    reused by the next one at once, and equal ids would make a busy loop look stuck.
    """

    def __init__(self) -> None:
        self._since: dict[object, tuple[float, int]] = {}  # frame -> (first seen, samples seen in)

    def sample(self, now: float, frames: Iterable[object]) -> None:
        since = self._since
        self._since = {f: (since[f][0], since[f][1] + 1) if f in since else (now, 1) for f in frames}

    def longest(self, now: float) -> tuple[float, int]:
        """(seconds, samples) of the frame present longest without a break; (0, 0) when none is."""
        if not self._since:
            return 0.0, 0
        first, samples = min(self._since.values(), key=lambda v: v[0])
        return now - first, samples


def _new_loop(use_uvloop: bool) -> tuple[asyncio.AbstractEventLoop, str]:
    """A fresh loop: uvloop's when asked for and importable (it is optional), else asyncio's."""
    if use_uvloop:
        try:
            uvloop: Any = importlib.import_module("uvloop")
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop(), "uvloop"
    return asyncio.new_event_loop(), "asyncio"


class EventLoopThread:
    """One thread running one event loop until :meth:`stop`.

    ``name`` names the thread; ``label`` names what runs on the loop (the handler) in the blocked-loop
    warning. ``threshold`` is the lag that counts as blocked, checked every ``interval`` seconds.
    """

    def __init__(
        self,
        label: str,
        *,
        name: str = "mtc75-loop",
        use_uvloop: bool = True,
        threshold: float = LAG_THRESHOLD,
        interval: float = LAG_INTERVAL,
    ) -> None:
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.label = label
        self.threshold = threshold
        self._name = name
        self._use_uvloop = use_uvloop
        self._interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self.kind = ""  # "uvloop" or "asyncio" once started
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._start_error: BaseException | None = None
        self._lag = LoopLag(interval, time.monotonic())
        self._stuck = StuckFrames()
        self.blocked_warnings = 0  # warnings logged (0 or 1)
        self.worst_block = 0.0  # largest lag above the threshold seen, seconds

    # -- owner side ---------------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the loop thread and its watchdog; returns once the loop runs (LoopError otherwise)."""
        if self._thread is not None:
            raise LoopError("event loop already started")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._start_error is not None:
            raise LoopError(f"event loop did not start: {self._start_error or f'not running after {timeout:g}s'}")
        self._watchdog = threading.Thread(target=self._watch, name=f"{self._name}-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self, timeout: float) -> bool:
        """Cancel what still runs on the loop, stop it and join its thread within ``timeout`` seconds.

        Returns False when the thread did not end in time (a handler blocking the loop): it is a daemon
        thread, so it cannot keep the process alive.
        """
        self._stopping.set()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return True
        with contextlib.suppress(RuntimeError):  # already closed
            loop.call_soon_threadsafe(self._cancel_all_and_stop)
        deadline = time.monotonic() + timeout
        thread.join(max(0.0, deadline - time.monotonic()))
        if self._watchdog is not None:
            self._watchdog.join(max(0.0, min(self._interval * 4, deadline - time.monotonic())))
        return not thread.is_alive()

    # -- any thread ---------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise LoopError("event loop not started")
        return self._loop

    @property
    def running(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set() and self._loop is not None

    def call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop thread soon (LoopError once the loop is stopped)."""
        if not self.running:
            raise LoopError("event loop is not running")
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError as err:  # closed between the check and the call
            raise LoopError(f"event loop is not running: {err}") from None

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run ``coro`` as a task on the loop; its result or error arrives on the returned future."""
        if not self.running:
            coro.close()  # never awaited: close it so Python does not warn about it later
            raise LoopError("event loop is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def cancel(self, tasks: Iterable[asyncio.Future[Any]]) -> None:
        """Cancel ``tasks`` on the loop thread (a no-op for those already done)."""
        chosen = list(tasks)
        if chosen:
            self.call_soon(_cancel_each, chosen)

    def lag(self) -> float:
        """Seconds the loop is behind now (see :class:`LoopLag`)."""
        return self._lag.lag(time.monotonic())

    @property
    def worst_lag(self) -> float:
        """Largest heartbeat delay seen since start (a healthy loop stays near 0)."""
        return self._lag.worst

    # -- loop thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            loop, self.kind = _new_loop(self._use_uvloop)
        except BaseException as err:  # reported by start(), never lost
            self._start_error = err
            self._ready.set()
            return
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.call_soon(self._started)
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _started(self) -> None:
        self._lag = LoopLag(self._interval, time.monotonic())
        self._ready.set()
        self._loop_call_later(self._beat)

    def _loop_call_later(self, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        self._loop.call_later(self._interval, callback)

    def _beat(self) -> None:
        self._lag.beat(time.monotonic())
        if not self._stopping.is_set():
            self._loop_call_later(self._beat)

    def _cancel_all_and_stop(self) -> None:
        assert self._loop is not None
        _cancel_each(asyncio.all_tasks(self._loop))
        # one more turn lets the cancelled tasks run their except/finally blocks before the loop ends
        self._loop.call_soon(self._loop.stop)

    # -- watchdog thread ----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Samples the loop thread's stack; blames a lag over the threshold on a coroutine stuck in it."""
        thread = self._thread
        assert thread is not None
        while not self._stopping.wait(self._interval):
            frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
            now = time.monotonic()
            self._stuck.sample(now, _coroutine_frames(frame))
            lag = self._lag.lag(now)
            if lag <= self.threshold:
                continue
            stuck_for, samples = self._stuck.longest(now)
            # sampled every interval: a frame there since the block began was first seen up to one interval late
            if samples >= MIN_SAMPLES and stuck_for >= self.threshold - self._interval:
                self._blocked(lag, _where(frame))
            del frame

    def _blocked(self, lag: float, where: str | None) -> None:
        self.worst_block = max(self.worst_block, lag)
        if self.blocked_warnings:
            return
        self.blocked_warnings = 1
        logger.warning(
            "handler %s blocked the event loop for %.2fs%s (over %.2fs): every coroutine in flight waits "
            "while it does; use await (e.g. asyncio.sleep, an async client) or asyncio.to_thread for "
            "blocking calls. Said once.",
            self.label, lag, f" at {where}" if where else "", self.threshold,
        )


def _coroutine_frames(frame: Any) -> list[object]:
    """The coroutine (and async generator) frames on a stack, innermost first."""
    out = []
    while frame is not None:
        if frame.f_code.co_flags & _COROUTINE_FLAGS:
            out.append(frame)
        frame = frame.f_back
    return out


def _where(frame: Any) -> str | None:
    """``file:line in function`` of the innermost frame of a stack (None for none)."""
    if frame is None:
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _cancel_each(tasks: Iterable[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
