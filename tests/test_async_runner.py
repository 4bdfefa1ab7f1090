"""The asyncio runner without a broker: shifts as tasks, failures settled, revoke cancels, bounded stop.

``Steps`` stands in for the dispatcher's worker steps (mtc75/runtime/runner.py ``WorkerSteps``): a
queue of messages, a count of running shifts and the settled results. The dispatcher's own steps are
run through this runner by the engine tests (tests/test_engine_unit.py, async section).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import pytest

from mtc75.core.offsets import PartitionState
from mtc75.core.work import Work
from mtc75.runtime import async_runner as async_runner_module
from mtc75.runtime.async_runner import AsyncRunner, RevokeCancelled
from mtc75.runtime.invoker import Invoker
from tests.fake_kafka import FakeMessage


class Steps:
    """A queue of messages handed out by shift generators, as the dispatcher's ``shift()`` does."""

    def __init__(self, works: list[Work]) -> None:
        self.queue: deque[Work] = deque(works)
        self.settled: dict[int, BaseException | None] = {}
        self.shifts = 0  # shifts begun and not ended
        self.begun = 0
        self.closed_early = 0  # shifts closed by the runner before they returned
        self.all_settled = threading.Event()
        self._total = len(works)

    def shift(self) -> Generator[Work, BaseException | None, None]:
        self.shifts += 1
        self.begun += 1
        try:
            while self.queue:
                work = self.queue.popleft()
                error = yield work
                self.settled[work.offset] = error
                if len(self.settled) == self._total:
                    self.all_settled.set()
        except GeneratorExit:
            self.closed_early += 1
            raise
        finally:
            self.shifts -= 1


def works(count: int, partition: int = 0, state: PartitionState | None = None, start: int = 0) -> list[Work]:
    state = state or PartitionState(("t", partition))
    return [Work(FakeMessage("t", partition, start + i), state, start + i) for i in range(count)]


@pytest.fixture
def make_runner() -> Any:
    made: list[AsyncRunner] = []

    def make(steps: Steps, handler: Callable[[Any], Any]) -> AsyncRunner:
        runner = AsyncRunner(steps, Invoker(handler, name="tests.handler:handle"), use_uvloop=False)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.shutdown(wait=False)


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_shifts_bound_the_coroutines_in_flight_on_one_thread(make_runner: Any) -> None:
    in_flight, peak = 0, 0

    async def handle(message: Any) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1

    steps = Steps(works(400))
    threads_before = threading.active_count()
    runner = make_runner(steps, handle)
    assert threading.active_count() == threads_before + 2  # the loop and its watchdog, whatever the bound
    started = time.monotonic()
    runner.spawn(100)  # 100 permits: 100 shifts
    assert steps.all_settled.wait(10.0)
    took = time.monotonic() - started
    assert set(steps.settled.values()) == {None}
    assert peak == 100  # exactly the permits: never more, and all of them used
    assert took < 2.0, f"4 rounds of 0.05 s took {took:.2f}s"  # serial: 20 s
    _wait(lambda: steps.shifts == 0)  # every shift ended once the queue was empty (its permit went back)
    assert steps.begun == 100 and runner.running == 0


def test_every_failure_is_settled_and_the_shift_goes_on(make_runner: Any) -> None:
    raised: dict[int, BaseException] = {1: ValueError("bad"), 2: SystemExit(3), 3: asyncio.CancelledError(),
                                        4: KeyboardInterrupt()}

    async def handle(message: Any) -> None:
        await asyncio.sleep(0)
        if message.offset() in raised:
            raise raised[message.offset()]

    steps = Steps(works(8))
    runner = make_runner(steps, handle)
    runner.spawn(1)  # one shift runs all eight: a failure must not end it
    assert steps.all_settled.wait(5.0)
    assert {o: e for o, e in steps.settled.items() if e is not None} == raised
    assert steps.begun == 1 and steps.closed_early == 0
    assert not isinstance(steps.settled[3], RevokeCancelled)  # the handler's own CancelledError, not ours


def test_cancel_ends_only_the_revoked_partitions_handlers_and_the_shifts_go_on(make_runner: Any) -> None:
    revoked, kept = PartitionState(("t", 0)), PartitionState(("t", 1))
    gate = asyncio.Event  # created on the loop by the first handler
    release: list[asyncio.Event] = []
    entered = threading.Semaphore(0)
    cancelling: dict[int, int] = {}

    async def handle(message: Any) -> None:
        cancelling[message.offset()] = asyncio.current_task().cancelling()  # type: ignore[union-attr]
        if not release:
            release.append(gate())
        entered.release()
        if message.offset() == 1:  # swallows the cancellation and finishes its work anyway
            try:
                await release[0].wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.01)
            return
        await release[0].wait()

    first = works(3, 0, revoked) + works(3, 1, kept, start=10)
    later = works(2, 1, kept, start=20)  # run by the same shifts after the cancellations
    steps = Steps(first + later)
    runner = make_runner(steps, handle)
    runner.spawn(6)
    for _ in range(6):
        assert entered.acquire(timeout=5.0)
    runner.cancel([revoked])
    _wait(lambda: len(steps.settled) == 3)
    assert isinstance(steps.settled[0], RevokeCancelled) and isinstance(steps.settled[2], RevokeCancelled)
    assert steps.settled[1] is None  # it swallowed the cancellation and returned
    assert runner.cancelled == 3
    for _ in range(2):  # the shifts that were cancelled took the later messages, whose waits are not cancelled
        assert entered.acquire(timeout=5.0)
    runner.loop_thread.call_soon(release[0].set)
    assert steps.all_settled.wait(5.0)
    assert [steps.settled[o] for o in (10, 11, 12, 20, 21)] == [None] * 5
    # the shift's task was un-cancelled: a later message's handler is not told it is being cancelled
    assert cancelling[20] == cancelling[21] == 0


def test_shutdown_cancels_what_runs_within_its_bound(make_runner: Any) -> None:
    async def forever(message: Any) -> None:
        await asyncio.Event().wait()

    steps = Steps(works(50))
    runner = make_runner(steps, forever)
    runner.spawn(50)
    _wait(lambda: runner.running == 50)
    started = time.monotonic()
    runner.shutdown(wait=False)
    assert time.monotonic() - started < 1.5
    assert len(steps.settled) == 50 and all(isinstance(e, RevokeCancelled) for e in steps.settled.values())
    assert not runner.loop_thread.running
    runner.spawn(1)  # after shutdown: nothing starts, no error


def test_shutdown_is_bounded_when_a_handler_blocks_the_loop(
    make_runner: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(async_runner_module, "STOP_TIMEOUT", 0.3)  # the bound, shortened: the test waits it out
    release = threading.Event()

    async def stuck(message: Any) -> None:
        release.wait(8.0)

    steps = Steps(works(1))
    runner = make_runner(steps, stuck)
    runner.spawn(1)
    time.sleep(0.1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        runner.shutdown(wait=True)
    assert time.monotonic() - started < 2.0  # STOP_TIMEOUT (0.3 s) and the loop's join (0.1 s), not the handler's 8 s
    assert "did not stop within" in caplog.text
    release.set()
