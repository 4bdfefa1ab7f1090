"""The event-loop thread, its lag monitor and async handler classification, without a broker."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import types
from typing import Any

import pytest

from mtc75.runtime.aio import LAG_THRESHOLD, EventLoopThread, LoopError, LoopLag, StuckFrames
from mtc75.runtime.handlers import handler_name, is_async_handler


@pytest.fixture
def loop_thread() -> Any:
    started: list[EventLoopThread] = []

    def make(**kwargs: Any) -> EventLoopThread:
        kwargs.setdefault("use_uvloop", False)
        runner = EventLoopThread("tests.handler:handle", **kwargs)
        runner.start()
        started.append(runner)
        return runner

    yield make
    for runner in started:
        runner.stop(2.0)


def _loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mtc75-loop")]


# -- LoopLag (pure) -----------------------------------------------------------------------------------


def test_loop_lag_is_the_delay_of_the_last_heartbeat_or_of_the_overdue_one() -> None:
    lag = LoopLag(0.05, now=100.0)
    assert lag.lag(100.03) == 0.0  # not due yet
    assert lag.beat(100.06) == pytest.approx(0.01)  # ran 10 ms late; next due at 100.11
    assert lag.lag(100.07) == pytest.approx(0.01)
    assert lag.lag(100.61) == pytest.approx(0.5)  # a block in progress: overdue by half a second
    assert lag.beat(100.61) == pytest.approx(0.5)  # and the heartbeat that finally ran says the same
    assert lag.beat(100.66) == 0.0
    assert lag.lag(100.66) == 0.0 and lag.worst == pytest.approx(0.5)
    with pytest.raises(ValueError, match="interval"):
        LoopLag(0.0, now=0.0)


# -- the loop thread ----------------------------------------------------------------------------------


def test_one_named_thread_runs_the_loop_and_stop_ends_it(loop_thread: Any) -> None:
    before = len(_loop_threads())
    runner = loop_thread()
    assert runner.kind == "asyncio" and runner.running
    assert len(_loop_threads()) == before + 2  # the loop and its watchdog
    ident = runner.submit(_thread_ident()).result(2.0)
    assert ident != threading.get_ident()
    assert next(t for t in threading.enumerate() if t.ident == ident).name == "mtc75-loop"
    assert runner.stop(2.0) is True
    assert len(_loop_threads()) == before
    assert runner.loop.is_closed()
    with pytest.raises(LoopError, match="not running"):
        runner.call_soon(print)
    coro = asyncio.sleep(0)
    with pytest.raises(LoopError, match="not running"):
        runner.submit(coro)
    assert coro.cr_frame is None  # closed, not left for a "never awaited" warning


async def _thread_ident() -> int:
    return threading.get_ident()


def test_uvloop_is_used_when_importable(monkeypatch: pytest.MonkeyPatch, loop_thread: Any) -> None:
    made: list[asyncio.AbstractEventLoop] = []

    def new_event_loop() -> asyncio.AbstractEventLoop:
        made.append(asyncio.new_event_loop())
        return made[-1]

    monkeypatch.setitem(__import__("sys").modules, "uvloop", types.SimpleNamespace(new_event_loop=new_event_loop))
    runner = loop_thread(use_uvloop=True)
    assert runner.kind == "uvloop" and runner.loop is made[0]
    assert loop_thread(use_uvloop=False).kind == "asyncio"


def test_a_loop_that_cannot_start_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> asyncio.AbstractEventLoop:
        raise OSError("no selector")

    monkeypatch.setattr(asyncio, "new_event_loop", broken)
    runner = EventLoopThread("h", use_uvloop=False)
    with pytest.raises(LoopError, match="did not start: no selector"):
        runner.start()
    assert runner.stop(1.0) is True


def test_a_thousand_waits_share_the_one_thread(loop_thread: Any) -> None:
    runner = loop_thread()
    threads_before = threading.active_count()
    started = time.monotonic()
    futures = [runner.submit(asyncio.sleep(0.2, result=i)) for i in range(1000)]
    assert [f.result(10.0) for f in futures] == list(range(1000))
    took = time.monotonic() - started
    assert took < 3.0, f"1000 waits of 0.2s took {took:.1f}s: they did not overlap"  # serial: 200 s
    assert threading.active_count() == threads_before


def test_cancel_ends_the_chosen_tasks_only(loop_thread: Any) -> None:
    runner = loop_thread()
    tasks: dict[int, asyncio.Task[str]] = {}
    made = threading.Event()

    async def wait(i: int) -> str:
        try:
            await asyncio.sleep(0.5)
            return "done"
        except asyncio.CancelledError:
            return "cancelled"  # swallowed: the task still ends, with this result

    def start() -> None:
        for i in range(6):
            tasks[i] = runner.loop.create_task(wait(i))
        made.set()

    runner.call_soon(start)
    assert made.wait(2.0)
    runner.cancel(tasks[i] for i in (1, 3))
    deadline = time.monotonic() + 5.0
    while not all(t.done() for t in tasks.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {i: t.result() for i, t in tasks.items()} == {
        0: "done", 1: "cancelled", 2: "done", 3: "cancelled", 4: "done", 5: "done",
    }
    runner.cancel([])  # nothing to do, no error


def test_stop_cancels_what_still_runs_and_lets_it_clean_up(loop_thread: Any) -> None:
    runner = loop_thread()
    cleaned = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    future = runner.submit(forever())
    time.sleep(0.1)
    started = time.monotonic()
    assert runner.stop(2.0) is True
    assert time.monotonic() - started < 1.0
    assert cleaned.is_set() and future.cancelled()


def test_stop_is_bounded_when_a_handler_blocks_the_loop(loop_thread: Any) -> None:
    runner = loop_thread()
    release = threading.Event()

    async def stuck() -> None:
        release.wait(10.0)  # blocks the loop thread itself

    runner.submit(stuck())
    time.sleep(0.1)
    started = time.monotonic()
    assert runner.stop(0.3) is False  # not joined: the thread is a daemon, the caller moves on
    assert time.monotonic() - started < 1.0
    release.set()


# -- blocked-loop detection ---------------------------------------------------------------------------


async def blocking_handler(seconds: float) -> None:
    time.sleep(seconds)  # the mistake being detected: a blocking call inside async def


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mtc75.runtime.aio" and r.levelno == logging.WARNING]


def test_a_handler_blocking_the_loop_is_named_once(loop_thread: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mtc75.runtime.aio")
    runner = loop_thread()
    runner.submit(blocking_handler(0.6)).result(5.0)
    runner.submit(blocking_handler(0.6)).result(5.0)
    time.sleep(0.2)  # the heartbeat after the second block has run
    lines = _warnings(caplog)
    assert len(lines) == 1, lines
    assert "tests.handler:handle blocked the event loop" in lines[0]
    # seen by the watchdog while it lasted: it says where the loop thread was stuck
    assert "test_aio.py" in lines[0] and "in blocking_handler" in lines[0]
    assert runner.blocked_warnings == 1 and runner.worst_block >= 0.4


def test_an_overloaded_loop_is_not_blamed_on_a_handler(loop_thread: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Lag without a stuck coroutine: one loop turn runs 0.6 s of short callbacks, each of them brief."""
    caplog.set_level(logging.WARNING, logger="mtc75.runtime.aio")
    runner = loop_thread()

    def brief() -> None:
        spin_until = time.perf_counter() + 0.0001
        while time.perf_counter() < spin_until:
            pass

    async def step() -> None:  # coroutines too, each on the stack for 0.1 ms only
        brief()

    def flood() -> None:
        for _ in range(3000):
            runner.loop.call_soon(brief)
            runner.loop.create_task(step())

    def lagged() -> float:  # the worst heartbeat delay, or the one overdue now (a flood still running)
        return max(runner.worst_lag, runner.lag())

    runner.call_soon(flood)
    # On a starved CPU the flood's turn can outlast any deadline: its lag counts while it still runs.
    deadline = time.monotonic() + 10
    while lagged() < 0.4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert lagged() >= LAG_THRESHOLD  # the loop did lag...
    assert _warnings(caplog) == []  # ...but no coroutine held it: no handler is named


def test_stuck_frames_need_one_frame_in_every_sample() -> None:
    stuck = StuckFrames()
    assert stuck.longest(0.0) == (0.0, 0)
    one, two, three = object(), object(), object()
    stuck.sample(0.0, [one, two])
    stuck.sample(0.05, [two, three])  # one left: it starts over if it comes back
    stuck.sample(0.10, [two, one])
    assert stuck.longest(0.10) == (pytest.approx(0.10), 3)  # frame 2, in all three samples
    stuck.sample(0.15, [])  # the loop went back to idle
    assert stuck.longest(0.15) == (0.0, 0)


def test_a_healthy_loop_is_not_reported(loop_thread: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mtc75.runtime.aio")
    runner = loop_thread()
    futures = [runner.submit(asyncio.sleep(0.01 * (i % 30))) for i in range(2000)]
    for f in futures:
        f.result(10.0)
    time.sleep(0.2)
    assert _warnings(caplog) == []  # (the flood of submissions itself may lag the loop: that is no block)


# -- which handlers run on the loop -------------------------------------------------------------------


async def coro_handler(message: Any) -> None:
    pass


def sync_handler(message: Any) -> None:
    pass


class AsyncCallable:
    async def __call__(self, message: Any) -> None:
        pass

    async def method(self, message: Any) -> None:
        pass


class SyncCallable:
    def __call__(self, message: Any) -> None:
        pass


async def gen_handler(message: Any) -> Any:
    yield message


def test_async_handlers_are_recognised_through_partials_and_objects() -> None:
    obj = AsyncCallable()
    for handler in (
        coro_handler, functools.partial(coro_handler), functools.partial(functools.partial(coro_handler)),
        obj, functools.partial(obj), obj.method, AsyncCallable.method,
    ):
        assert is_async_handler(handler), handler
    for handler in (
        sync_handler, functools.partial(sync_handler), SyncCallable(), print, SyncCallable,
        lambda m: coro_handler(m),  # returns a coroutine, but nothing tells before the call: a failure then
        gen_handler,  # an async generator is not awaitable
    ):
        assert not is_async_handler(handler), handler


def test_handler_names_reach_the_function_behind_wrappers() -> None:
    assert handler_name(coro_handler) == "tests.test_aio.coro_handler"
    assert handler_name(functools.partial(coro_handler)) == "tests.test_aio.coro_handler"
    assert handler_name(AsyncCallable()) == "tests.test_aio.AsyncCallable"
    assert handler_name(print) == "print"
