"""RUNNER="processes" without a broker: the worker pool, the invoker's process kind, and the real engine on the
in-memory fake with handlers in worker processes (tests/process_handlers.py: they take their orders from the
message and write a journal, since they share no memory with the test).

Every wait is bounded; the bounds are generous because each run starts worker processes (an interpreter
and an import each) on a machine that may be loaded.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from mtc75 import testing
from mtc75.core.offsets import OffsetTracker
from mtc75.core.work import Work
from mtc75.errors import HandlerRefused
from mtc75.kafka.deadletter import H_ERROR, H_OFFSET
from mtc75.runtime.async_runner import runner_for
from mtc75.runtime.handlers import SimulatedWork, describe_error
from mtc75.runtime.invoker import Invoker, Partial
from mtc75.runtime.process_runner import ProcessRunner
from mtc75.runtime.procpool import ProcessPool, WorkerLost
from mtc75.runtime.procworker import (
    PlainMessage,
    RemoteTraceback,
    UnpicklableError,
    pack,
    read_failure,
    unpack,
    wire_failure,
)
from tests import process_handlers as ph
from tests.fake_kafka import FakeKafka, FakeMessage
from tests.kafka_helpers import run_script, script_env, wait_until
from tests.test_engine_unit import GROUP, P0, TOPIC, Run, runs_on
from tests.test_scripts import _one_error_line as one_error_line

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # bound of a wait for something that takes milliseconds on a quiet machine (process starts)
ORPHAN_BOUND = 5.0  # seconds in which a worker process must notice that its consumer is gone


# -- helpers --------------------------------------------------------------------------------------------


class Journal:
    """The lines the handlers of tests/process_handlers.py wrote: ``event pid partition offset time extra``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self, event: str | None = None) -> list[list[str]]:
        if not self.path.exists():
            return []
        rows = [line.split(" ", 5) for line in self.path.read_text().splitlines()]
        return [r for r in rows if event is None or r[0] == event]

    def count(self, event: str) -> Counter[tuple[int, int]]:
        return Counter((int(r[2]), int(r[3])) for r in self.lines(event))

    def pids(self) -> set[int]:
        return {int(r[1]) for r in self.lines()}


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Journal:
    """The worker processes inherit the environment: where to write, where the once-markers go."""
    once = tmp_path / "once"
    once.mkdir()
    monkeypatch.setenv(ph.JOURNAL, str(tmp_path / "journal"))
    monkeypatch.setenv(ph.ONCE, str(once))
    monkeypatch.setenv(ph.RELEASE, str(tmp_path / "release"))
    return Journal(tmp_path / "journal")


def release() -> None:
    Path(os.environ[ph.RELEASE]).touch()


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has ended: reaping it is its parent's business)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def cluster() -> Iterator[FakeKafka]:
    fake = FakeKafka()
    fake.create_topic(TOPIC, 3)
    yield fake
    assert fake.violations == []


@pytest.fixture
def start(cluster: FakeKafka) -> Iterator[Callable[..., Run]]:
    """Runs of the real engine with RUNNER="processes"; every one stopped at teardown, and no child left."""
    with runs_on(cluster, RUNNER="processes", PROCESS_COUNT=2) as begin:
        yield lambda handler=ph.handle, **changes: begin(handler, **changes)
        if ph.RELEASE in os.environ:
            release()
    wait_until(lambda: not children(os.getpid()), WAIT, what="no worker process left after the runs")


def produce(cluster: FakeKafka, partition: int, count: int, **order: Any) -> None:
    value = ("{" + ", ".join(f'"{k}": {v!r}' for k, v in order.items()).replace("'", '"') + "}").encode()
    for _ in range(count):
        cluster.produce(TOPIC, partition, value, key=b"k%d" % (len(cluster.messages(TOPIC)) % 5))


# -- the wire ---------------------------------------------------------------------------------------------


def test_a_plain_message_has_the_message_accessors_and_pickles() -> None:
    original = FakeMessage(TOPIC, 2, 7, b'{"a": 1}', key=b"k", headers=[("h", b"v")])
    [plain] = unpack(*pack([original]))
    assert (plain.topic(), plain.partition(), plain.offset(), plain.key(), plain.value(), plain.headers(),
            plain.timestamp(), plain.error(), len(plain)) == (
        TOPIC, 2, 7, b"k", b'{"a": 1}', [("h", b"v")], original.timestamp(), None, 8)
    again = pickle.loads(pickle.dumps(plain))
    assert isinstance(again, PlainMessage) and again.offset() == 7 and again.headers() == [("h", b"v")]


def test_an_error_that_cannot_be_rebuilt_crosses_as_its_type_name_and_text() -> None:
    try:
        raise ph.OddError(7, "cannot be rebuilt")
    except ph.OddError as err:
        odd = read_failure(*wire_failure(3, err)[1:])
    assert isinstance(odd, UnpicklableError)
    assert describe_error(odd) == "OddError: odd 7: cannot be rebuilt"
    try:
        raise ValueError("plain")
    except ValueError as err:
        index, *rest = wire_failure(0, err)
    plain = read_failure(*rest)
    assert type(plain) is ValueError and str(plain) == "plain" and index == 0
    assert isinstance(plain.__cause__, RemoteTraceback) and "test_process_runner.py" in str(plain.__cause__)


# -- refusals -------------------------------------------------------------------------------------------


def test_what_cannot_reach_a_worker_process_is_refused_when_the_consumer_is_built(cluster: FakeKafka) -> None:
    def nested(message: Any) -> None:
        pass

    def in_main(message: Any) -> None:
        pass

    in_main.__module__ = "__main__"
    for handler, why in ((nested, "cannot be sent to worker processes"), (lambda m: None, "cannot be sent"),
                         (in_main, r"defined in the script being run \(__main__\)")):
        with pytest.raises(HandlerRefused, match=why):
            testing.consumer(cluster.factories(), handler, topic=TOPIC, group_id=GROUP, runner="processes")
    assert cluster.consumers == []


def test_an_async_handler_keeps_the_event_loop_under_runner_processes() -> None:
    async def handle(message: Any) -> None:
        pass

    invoker = Invoker(handle, processes=2)
    assert invoker.is_async and invoker.processes == 0 and runner_for(invoker).__name__ == "AsyncRunner"
    assert runner_for(Invoker(ph.handle, processes=2)) is ProcessRunner
    assert runner_for(Invoker(ph.handle)).__name__ == "ThreadRunner"


@pytest.mark.parametrize(("handler", "why"), [
    (ph.missing_module, "ModuleNotFoundError: No module named 'tests.no_such_module_for_workers'"),
    (ph.exits_at_load, r"called sys.exit\(4\)"),
    (ph.dies_at_load, "its worker process exited with code 9 while loading it"),
])
def test_a_handler_the_worker_processes_cannot_load_is_refused_before_any_client_is_built(
    cluster: FakeKafka, start: Callable[..., Run], handler: Any, why: str
) -> None:
    run = start(handler)
    with pytest.raises(HandlerRefused, match=why):
        run.join(WAIT)
    assert cluster.consumers == []  # nothing connected: not even the fetch-size probe
    assert not children(os.getpid())


@pytest.mark.parametrize(("args", "fragment"), [
    (["--handler", "tests.process_handlers:missing_module"],
     "cannot run in a worker process (RUNNER=processes): ModuleNotFoundError: No module named "
     "'tests.no_such_module_for_workers'"),
    (["--handler", "tests.process_handlers:dies_at_load"], "its worker process exited with code 9 while loading it"),
    (["--process-count", "-1"], "invalid PROCESS_COUNT='-1' (from --process-count): must be >= 0"),
])
def test_the_script_refuses_with_one_line_and_exit_2_before_connecting(args: list[str], fragment: str) -> None:
    result = run_script("mtc75_consumer.py", "--runner", "processes", *args, env=script_env("127.0.0.1:1"),
                        timeout=90)
    assert result.returncode == 2, result.stderr
    assert fragment in one_error_line(result.stderr, "mtc75_consumer.py")


def test_an_unknown_runner_is_one_line_and_exit_2() -> None:
    result = run_script("mtc75_consumer.py", "--runner", "cores", env=script_env("127.0.0.1:1"), timeout=30)
    assert result.returncode == 2
    assert "invalid RUNNER='cores' (from --runner): must be one of threads, processes" in one_error_line(
        result.stderr, "mtc75_consumer.py")


def test_the_default_handler_pickles_with_a_lock_of_its_own() -> None:
    work = SimulatedWork(0.25, max_payload_bytes=10)
    copy = pickle.loads(pickle.dumps(work))
    assert (copy.processing_sleep, copy.max_payload_bytes) == (0.25, 10) and copy._lock is not work._lock


# -- the pool ---------------------------------------------------------------------------------------------


@pytest.fixture
def pool(journal: Journal) -> Iterator[ProcessPool]:
    invoker = Invoker(ph.handle, processes=2)
    made = ProcessPool(invoker.pickled, 2, invoker.name)
    made.start()
    yield made
    made.close()
    assert not children(os.getpid())


def _call(pool: ProcessPool, *messages: FakeMessage) -> Any:
    return pool.call(list(messages), False, None, lambda: True)


def test_a_worker_killed_mid_message_fails_that_message_alone_and_is_replaced(
    pool: ProcessPool, journal: Journal
) -> None:
    before = set(pool.pids)
    hang = FakeMessage(TOPIC, 0, 1, b'{"do": "hang"}')
    replies: list[Any] = []
    caller = threading.Thread(target=lambda: replies.append(_call(pool, hang)), daemon=True)
    caller.start()
    wait_until(lambda: journal.count("start")[(0, 1)] == 1, WAIT, what="the hang started")
    [victim] = {int(r[1]) for r in journal.lines("start")}
    os.kill(victim, signal.SIGKILL)
    caller.join(WAIT)
    [reply] = replies
    assert isinstance(reply.lost, WorkerLost) and "killed by SIGKILL while running it" in str(reply.lost)
    wait_until(lambda: len(pool.pids) == 2 and victim not in pool.pids, WAIT, what="a replacement process")
    assert set(pool.pids) - before and pool.deaths == 1
    ok = _call(pool, FakeMessage(TOPIC, 0, 2, b"{}"))
    assert (ok.handled, ok.failures, ok.lost) == (1, [], None)
    assert not running(victim)


def test_calls_wait_for_a_free_process_not_behind_a_busy_one(pool: ProcessPool, journal: Journal) -> None:
    replies: dict[int, Any] = {}

    def call(offset: int, do: str) -> None:
        replies[offset] = _call(pool, FakeMessage(TOPIC, 0, offset, f'{{"do": "{do}"}}'.encode()))

    hang = threading.Thread(target=call, args=(0, "hang"), daemon=True)
    hang.start()
    wait_until(lambda: journal.count("start")[(0, 0)] == 1, WAIT, what="the hang running")
    others = [threading.Thread(target=call, args=(o, "ok"), daemon=True) for o in range(1, 6)]
    for t in others:
        t.start()
    for t in others:
        t.join(WAIT)
    # every other call ran on the one free process while the hang held the other
    assert all(replies[o].lost is None and replies[o].handled == 1 for o in range(1, 6))
    [hung_in] = {int(r[1]) for r in journal.lines("start") if r[3] == "0"}
    assert {int(r[1]) for r in journal.lines("done")} == set(pool.pids) - {hung_in}
    victim = hung_in
    os.kill(victim, signal.SIGKILL)
    hang.join(WAIT)
    assert isinstance(replies[0].lost, WorkerLost)
    assert journal.count("done") == Counter({(0, o): 1 for o in range(1, 6)})


def _calls_in_threads(pool: ProcessPool, replies: dict[int, Any]) -> Callable[[int, str], threading.Thread]:
    """``start(offset, order)``: a thread calling ``pool`` with one message whose value is ``order`` (JSON)."""

    def start(offset: int, order: str) -> threading.Thread:
        message = FakeMessage(TOPIC, 0, offset, order.encode())
        thread = threading.Thread(target=lambda: replies.__setitem__(offset, _call(pool, message)), daemon=True)
        thread.start()
        return thread

    return start


def _pid_of(journal: Journal, event: str, offset: int) -> int:
    [pid] = {int(r[1]) for r in journal.lines(event) if r[3] == str(offset)}
    return pid


def test_a_call_sent_ahead_to_a_hung_process_is_taken_back_runs_elsewhere_and_only_once(
    pool: ProcessPool, journal: Journal
) -> None:
    replies: dict[int, Any] = {}
    start = _calls_in_threads(pool, replies)
    start(0, '{"do": "ok"}').join(WAIT)  # a short call: calls may be sent ahead from now on
    hang = start(1, '{"do": "hang"}')  # the first free process: slot 0's, where the next one goes ahead
    wait_until(lambda: journal.count("start")[(0, 1)] == 1, WAIT, what="the hang running")
    start(2, '{"ms": 1000}')
    wait_until(lambda: journal.count("start")[(0, 2)] == 1, WAIT, what="the other process busy")
    start(3, '{"do": "ok"}').join(WAIT)  # sent ahead behind the hang, taken back at its lease's end
    assert replies[3].lost is None and replies[3].handled == 1, "it ran while the hang held its process"
    assert _pid_of(journal, "done", 3) == _pid_of(journal, "done", 2) != _pid_of(journal, "start", 1)
    Path(os.environ[ph.RELEASE]).touch()
    hang.join(WAIT)
    assert replies[1].lost is None
    _call(pool, FakeMessage(TOPIC, 0, 4, b'{"do": "ok"}'))  # the hung process read its copy: refused, not run
    assert journal.count("start") == Counter({(0, o): 1 for o in range(5)})


def test_a_call_sent_ahead_to_a_process_that_dies_runs_elsewhere_at_no_cost(
    pool: ProcessPool, journal: Journal
) -> None:
    replies: dict[int, Any] = {}
    start = _calls_in_threads(pool, replies)
    start(0, '{"do": "ok"}').join(WAIT)
    dies = start(1, '{"do": "kill", "ms": 150}')  # slot 0's process, dead within the ahead call's lease
    wait_until(lambda: journal.count("start")[(0, 1)] == 1, WAIT, what="the doomed call running")
    start(2, '{"ms": 600}')
    wait_until(lambda: journal.count("start")[(0, 2)] == 1, WAIT, what="the other process busy")
    ahead = start(3, '{"do": "ok"}')
    for thread in (dies, ahead):
        thread.join(WAIT)
    assert isinstance(replies[1].lost, WorkerLost)
    assert replies[3].lost is None and replies[3].handled == 1 and replies[3].failures == []
    assert journal.count("done")[(0, 3)] == 1 and journal.count("start")[(0, 3)] == 1


# -- the engine, on the fake ------------------------------------------------------------------------------


def test_every_message_runs_once_in_the_worker_processes_and_is_committed_to_the_end(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal
) -> None:
    cluster.fill(TOPIC, {0: 40, 1: 40, 2: 40})
    run = start(MAX_THREAD_COUNT=6, max_messages=120)
    assert run.stats().workers == "messages"
    stats = run.join(WAIT)
    assert journal.count("done") == Counter({(p, o): 1 for p in range(3) for o in range(40)})
    pids = journal.pids()
    assert len(pids) == 2 and os.getpid() not in pids  # both worker processes, never the consumer's own
    assert stats.processed == 120 and stats.failed == 0 and stats.max_active_threads <= 6
    assert [cluster.committed(GROUP, TOPIC, p) for p in range(3)] == [40, 40, 40]


def test_the_handler_gets_a_plain_message_with_every_accessor(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal
) -> None:
    cluster.produce(TOPIC, 1, b'{"x": 1}', key=b"key", headers=[("trace", b"t1")])
    start(ph.echo, max_messages=1).join(WAIT)
    [row] = journal.lines("echo")
    original = cluster.messages(TOPIC)[0]
    assert row[5] == repr((TOPIC, 1, 0, b"key", b'{"x": 1}', [("trace", b"t1")], original.timestamp(), None, 8,
                           "PlainMessage"))


@pytest.mark.parametrize("death", ["kill", "exit", "segv"])
def test_a_worker_process_that_dies_mid_message_costs_that_message_one_attempt_and_nothing_else(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal, death: str
) -> None:
    produce(cluster, 0, 5, ms=1)  # 1 ms a message: single messages, never chunks
    produce(cluster, 0, 1, do=death, ms=1)  # offset 5: kills its process on the first attempt
    produce(cluster, 0, 10, ms=1)
    produce(cluster, 1, 16, ms=1)
    run = start(MAX_ATTEMPTS=2, max_messages=32)
    stats = run.join(WAIT)
    starts, done = journal.count("start"), journal.count("done")
    assert starts[(0, 5)] == 2 and done[(0, 5)] == 1  # failed once (the death), then done
    assert done == Counter({(p, o): 1 for p, n in ((0, 16), (1, 16)) for o in range(n)})
    assert all(n == 1 for where, n in starts.items() if where != (0, 5))  # queued neighbours: not re-run
    assert (stats.processed, stats.failed, stats.retried) == (32, 0, 1)
    assert [cluster.committed(GROUP, TOPIC, p) for p in (0, 1)] == [16, 16]


def test_a_chunk_whose_process_dies_runs_again_as_single_messages_and_only_the_killer_fails(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal
) -> None:
    produce(cluster, 0, 1000)  # a fast handler: chunks
    produce(cluster, 0, 1, do="kill-always")  # offset 1000 kills its process on every call
    produce(cluster, 0, 999)
    produce(cluster, 1, 2000)
    stats = start(MAX_ATTEMPTS=2, max_messages=4000).join(WAIT)
    starts, done = journal.count("start"), journal.count("done")
    # in a chunk it is handed back untried, with the rest of the chunk; alone it fails twice, then is skipped
    assert starts[(0, 1000)] in (2, 3) and done[(0, 1000)] == 0
    assert (stats.processed, stats.failed, stats.retried) == (4000, 1, 1)
    assert set(done) == {(p, o) for p in (0, 1) for o in range(2000)} - {(0, 1000)}
    assert all(n == 1 for (p, _o), n in done.items() if p == 1)
    # what ran twice is the part of the killer's chunk before it, run again as single messages
    twice = {o for (p, o), n in done.items() if n > 1 and p == 0}
    block = {*twice, 1000}
    assert block == set(range(min(block), max(block) + 1))
    assert [cluster.committed(GROUP, TOPIC, p) for p in (0, 1)] == [2000, 2000]


def test_failures_are_retried_then_dead_lettered_with_their_type_and_text(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal
) -> None:
    produce(cluster, 0, 2)
    produce(cluster, 0, 1, do="fail")
    produce(cluster, 0, 1, do="odd-error")
    produce(cluster, 0, 1, do="fail-once")
    stats = start(ON_FAILURE="dlq", MAX_ATTEMPTS=2, RETRY_BACKOFF_MAX=0.05, max_messages=5).join(WAIT)
    starts = journal.count("start")
    assert (starts[(0, 2)], starts[(0, 3)], starts[(0, 4)]) == (2, 2, 2)
    letters = {int(headers[H_OFFSET]): headers
               for headers in (dict(r.headers() or []) for r in cluster.messages("orders.dlq"))}
    assert sorted(letters) == [2, 3]
    assert letters[2][H_ERROR] == b"ValueError: fails at 0@2"
    assert letters[3][H_ERROR] == b"OddError: odd 7: cannot be rebuilt"
    assert (stats.processed, stats.failed, stats.dead_lettered, stats.retried) == (5, 2, 2, 3)
    assert cluster.committed(GROUP, TOPIC, 0) == 5


@pytest.mark.parametrize("ordering", ["partition", "key"])
def test_ordering_modes_hold_in_worker_processes(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal, ordering: str
) -> None:
    for p in range(3):
        produce(cluster, p, 30, ms=1)
    start(ORDERING=ordering, MAX_THREAD_COUNT=8, max_messages=90).join(WAIT)
    keys = {(m.partition(), m.offset()): m.key() for m in cluster.messages(TOPIC)}
    spans: dict[tuple[Any, ...], list[tuple[int, float, float]]] = defaultdict(list)
    begun = {(int(r[2]), int(r[3])): float(r[4]) for r in journal.lines("start")}
    for r in journal.lines("done"):
        where = (int(r[2]), int(r[3]))
        lane = (where[0],) if ordering == "partition" else (where[0], keys[where])
        spans[lane].append((where[1], begun[where], float(r[4])))
    assert sum(len(s) for s in spans.values()) == 90
    overlaps = 0
    for lane in spans.values():
        lane.sort(key=lambda s: s[1])
        assert [s[0] for s in lane] == sorted(s[0] for s in lane)  # in offset order
        overlaps += sum(1 for a, b in pairwise(lane) if b[1] < a[2])
    assert overlaps == 0  # one at a time per lane, across the processes too
    assert len(journal.pids()) == 2


def test_revoke_waits_then_kills_the_process_running_the_revoked_partitions_message(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal
) -> None:
    produce(cluster, 0, 2)
    produce(cluster, 0, 1, do="hang")  # p0@2 hangs
    produce(cluster, 0, 1)
    produce(cluster, 1, 4)
    run = start(REVOKE_TIMEOUT=1.0, MAX_THREAD_COUNT=4,
                CONSUMER_CONFIG={"partition.assignment.strategy": "cooperative-sticky"})
    wait_until(lambda: journal.count("start")[(0, 2)] == 1 and sum(journal.count("done").values()) == 7, WAIT,
               what="all but the hang done")
    victim = int(next(r for r in journal.lines("start") if (r[2], r[3]) == ("0", "2"))[1])
    consumer = cluster.consumer()
    asked = time.monotonic()
    revoked = consumer.rebalance(revoke=[P0])
    assert revoked.wait(WAIT)
    assert time.monotonic() - asked >= 0.9  # REVOKE_TIMEOUT first
    wait_until(lambda: not running(victim), WAIT, what="the process running the revoked message killed")
    assert cluster.committed(GROUP, TOPIC, 0) == 2  # below the hung message
    release()
    assert consumer.rebalance(assign=[P0]).wait(WAIT)
    wait_until(lambda: journal.count("done")[(0, 2)] == 1 and cluster.committed(GROUP, TOPIC, 0) == 4, WAIT,
               what="the revoked message run again and committed")
    stats = run.stop()
    assert stats.failed == 0 and stats.abandoned >= 1


def test_shutdown_kills_a_worker_past_the_timeout_and_leaves_no_process(
    cluster: FakeKafka, start: Callable[..., Run], journal: Journal
) -> None:
    produce(cluster, 0, 3)
    produce(cluster, 0, 1, do="hang")
    run = start(SHUTDOWN_TIMEOUT=0.5)
    wait_until(lambda: sum(journal.count("done").values()) == 3 and journal.count("start")[(0, 3)] == 1, WAIT,
               what="all but the hang done")
    pids = journal.pids()
    stopped = time.monotonic()
    stats = run.stop()
    assert time.monotonic() - stopped < 0.5 + 2 * 2.0 + 2.0  # SHUTDOWN_TIMEOUT, then STOP_TIMEOUT (bounded)
    assert stats.abandoned == 1 and cluster.committed(GROUP, TOPIC, 0) == 3
    assert not children(os.getpid()) and not any(running(p) for p in pids)


def test_a_fast_handler_crosses_in_chunks(cluster: FakeKafka, start: Callable[..., Run], journal: Journal) -> None:
    calls = Counter[str]()
    original = ProcessPool.call

    def counted(self: ProcessPool, messages: Any, *args: Any) -> Any:
        calls["calls"] += 1
        calls["messages"] += len(messages)
        calls["largest"] = max(calls["largest"], len(messages))
        return original(self, messages, *args)

    ProcessPool.call = counted  # type: ignore[method-assign]
    try:
        cluster.fill(TOPIC, {0: 3000, 1: 3000})
        stats = start(ph.noop, MAX_THREAD_COUNT=4, max_messages=6000).join(WAIT)
    finally:
        ProcessPool.call = original  # type: ignore[method-assign]
    assert stats.processed == 6000 and calls["messages"] == 6000
    # runs formed (the fake delivers small batches: the engine's own test asks only that much) and each ran
    # as one call
    assert calls["largest"] >= 10 and calls["calls"] < 6000


# -- a consumer killed with -9 ----------------------------------------------------------------------------

CONSUMER = textwrap.dedent("""
    import sys, time
    from mtc75 import testing
    from tests.fake_kafka import FakeKafka
    from tests import process_handlers as ph
    fake = FakeKafka()
    fake.create_topic("orders", 1)
    fake.produce("orders", 0, b'{%s}')
    consumer = testing.consumer(fake.factories(), ph.handle, topic="orders", group_id="g", runner="processes",
                                process_count=2, on_failure="skip")
    consumer.start()
    print("started", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("busy", ["hang", "spin"])
def test_no_worker_process_outlives_a_consumer_killed_with_sigkill(
    tmp_path: Path, journal: Journal, busy: str
) -> None:
    code = CONSUMER % ('"do": "hang"' if busy == "hang" else '"ms": 600000')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    consumer = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert consumer.stdout is not None
        assert consumer.stdout.readline().strip() == "started"
        wait_until(lambda: journal.count("start")[(0, 0)] == 1, WAIT, what="the handler running in a worker")
        workers = children(consumer.pid)
        assert len(workers) == 2  # one busy in the handler, one idle
        consumer.kill()
        consumer.wait(WAIT)
        killed = time.monotonic()
        wait_until(lambda: not any(running(p) for p in workers), ORPHAN_BOUND, step=0.02,
                   what="the worker processes of the killed consumer to exit")
        assert time.monotonic() - killed < ORPHAN_BOUND
    finally:
        consumer.kill()
        consumer.wait(WAIT)


def test_a_partial_reply_of_a_chunk_is_the_same_outcome_as_in_a_thread(pool: ProcessPool, journal: Journal) -> None:
    invoker = Invoker(ph.handle, processes=2)
    tracker = OffsetTracker()
    tracker.assign([P0])
    state = tracker.state(P0)
    messages = [FakeMessage(TOPIC, 0, o, b'{"do": "fail"}' if o == 2 else b"{}") for o in range(5)]
    outcome = invoker.invoke_in(pool, Work.chunk(messages, state, 0))
    assert isinstance(outcome, Partial) and outcome.handled == 5
    [(index, error)] = outcome.failures
    assert index == 2 and describe_error(error) == "ValueError: fails at 0@2"
    single = invoker.invoke_in(pool, Work(messages[2], state, 2))
    assert isinstance(single, ValueError)
    assert invoker.invoke_in(pool, Work(messages[0], state, 0)) is None
    state.closing = True  # revoked: a Work not yet sent is never run
    given_up = invoker.invoke_in(pool, Work(messages[0], state, 0))
    assert isinstance(given_up, WorkerLost) and "revoked before it started" in str(given_up)
    assert functools.reduce(lambda n, r: n + (r[0] == "start"), journal.lines(), 0) == 7
