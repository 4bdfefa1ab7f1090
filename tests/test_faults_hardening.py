"""Fault injection, part two (issue 8): the holes test_faults.py did not reach.

Each test runs ``mtc75_consumer.py`` as a user would, against the session's real broker, on its own
topic and group, with every wait bounded. What was handled is recorded *outside* the consumer process
(tests/hardening_handler.py appends ``partition:offset:id:tag`` after the work and flushes), and each
test prints a ``FIGURES {...}`` line that RELIABILITY.md quotes (``make faults`` collects them).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from mtc75.core.offsets import OffsetTracker
from mtc75.core.work import Work
from mtc75.errors import HandlerRefused
from mtc75.kafka.deadletter import H_OFFSET, H_TRUNCATED, TRUNCATED_VALUE_BYTES
from mtc75.runtime.dispatcher import Dispatcher
from mtc75.runtime.handlers import describe_error, prepare_handler
from mtc75.runtime.invoker import Invoker
from tests.fake_kafka import FakeMessage
from tests.kafka_helpers import (
    ROOT,
    committed_offsets,
    end_offsets,
    read_colon_lines,
    read_topic,
    report_figures,
    run_script,
    script_env,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]

PROG = "mtc75_consumer.py"
HANDLER = ("--handler", "tests.hardening_handler:handle")
SHUTDOWN = 3.0  # SHUTDOWN_TIMEOUT of the hung-handler tests
EXIT_SLACK = 6.0  # "a few seconds" past SHUTDOWN_TIMEOUT: process exit, leaving the group, a loaded CPU


# -- helpers --------------------------------------------------------------------------------------------


def _produce(bootstrap: str, topic: str, records: list[dict], partition: int | None = None,
             conf: dict | None = None) -> None:
    """JSON records (to ``partition``, or round-robin by id); retried while a new topic's metadata settles."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **(conf or {})})
    todo = list(records)
    deadline = time.monotonic() + 60
    while todo:
        failed: list[dict] = []
        for record in todo:
            kwargs = {} if partition is None else {"partition": partition}
            producer.produce(topic, value=json.dumps(record).encode(), key=str(record.get("id")),
                             on_delivery=lambda e, _m, r=record, out=failed: e is not None and out.append(r),
                             **kwargs)
            producer.poll(0)
        assert producer.flush(30) == 0, "produce did not finish"
        todo = failed
        assert time.monotonic() < deadline, f"produce failed for {len(todo)} records"
        if todo:
            time.sleep(0.5)


def _records(path: Path) -> list[tuple[int, int, int, str]]:
    return [(int(p), int(o), int(n), tag) for p, o, n, tag in read_colon_lines(path, 4)]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / PROG), *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _error_lines(text: str, prog: str = PROG) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"{prog}: error: ")]


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap})


def _delete_topic(bootstrap: str, topic: str) -> None:
    admin = _admin(bootstrap)  # kept alive until the answer is in
    admin.delete_topics([topic], operation_timeout=15)[topic].result(timeout=30)
    # Deletion completes asynchronously: wait until the name is free.
    admin = _admin(bootstrap)
    wait_until(lambda: topic not in admin.list_topics(timeout=10).topics, timeout=30, what="topic deleted")


def _create_topic_anew(bootstrap: str, topic: str, partitions: int) -> None:
    """Create ``topic``, retrying while the old one with that name is still being deleted."""
    deadline = time.monotonic() + 60
    while True:
        admin = _admin(bootstrap)
        future = admin.create_topics([NewTopic(topic, partitions, 1)], operation_timeout=15)[topic]
        try:
            future.result(timeout=30)
            return
        except KafkaException as err:
            if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def _base_args(topic: str, group: str, *extra: str) -> list[str]:
    return ["--topic", topic, "--group-id", group, *HANDLER, "--no-reload", "--commit-interval", "0.2", *extra]


# -- 1, 2: the topic deleted, or deleted and re-created, while the consumer runs --------------------------


def test_topic_recreated_while_consuming_is_read_again_from_the_start_and_nothing_unhandled_is_committed(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    old_per_partition, new_per_partition, partitions = 60, 150, 2
    topic, group = make_topic(partitions=partitions), unique("g")
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    for p in range(partitions):
        _produce(bootstrap, topic, [{"id": p * 1000 + i, "gen": 1} for i in range(old_per_partition)], partition=p)
    proc = _start(_base_args(topic, group, "--max-thread-count", "4"), script_env(bootstrap, MTC75_TEST_RECORD=str(
        record)), log)
    try:
        wait_until(lambda: len(_records(record)) >= partitions * old_per_partition, 60, what="old topic handled")
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == {p: old_per_partition for p in
                                                                          range(partitions)}, 30, what="old commits")
        before = len(_records(record))
        _delete_topic(bootstrap, topic)
        _create_topic_anew(bootstrap, topic, partitions)
        recreated_at = time.monotonic()
        new_ids = set()
        for p in range(partitions):
            batch = [{"id": 100_000 + p * 1000 + i, "gen": 2} for i in range(new_per_partition)]
            new_ids |= {r["id"] for r in batch}
            _produce(bootstrap, topic, batch, partition=p)

        def handled_new() -> set[int]:
            return {r[2] for r in _records(record)[before:] if r[2] in new_ids}

        wait_until(lambda: handled_new() == new_ids, 60, what="every message of the re-created topic handled")
        all_handled_s = time.monotonic() - recreated_at
        ends = end_offsets(bootstrap, topic)
        wait_until(lambda: committed_offsets(bootstrap, group, topic) == ends, 30, what="commits at the new end")
        assert proc.poll() is None, "the consumer should keep consuming the re-created topic"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)
    text = log.read_text()
    assert "re-created" in text, text[-3000:]
    new_records = [r for r in _records(record)[before:] if r[2] in new_ids]
    lost = new_ids - {r[2] for r in new_records}
    report_figures(
        "topic_recreated", old_messages=partitions * old_per_partition, new_messages=len(new_ids), lost=len(lost),
        duplicates=len(new_records) - len(set(new_records)), recreate_to_all_handled_s=round(all_handled_s, 1),
        committed_at_end=committed_offsets(bootstrap, group, topic) == ends,  # read again after the exit
    )


def test_topic_deleted_while_consuming_is_one_error_line_and_exit_3(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=2), unique("g")
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    _produce(bootstrap, topic, [{"id": i} for i in range(100)])
    proc = _start(_base_args(topic, group, "--idle-exit", "60"), script_env(bootstrap, MTC75_TEST_RECORD=str(record)),
                  log)
    try:
        wait_until(lambda: len(_records(record)) >= 100, 60, what="messages handled")
        _delete_topic(bootstrap, topic)
        deleted_at = time.monotonic()
        code = proc.wait(timeout=45)
        exited_after = time.monotonic() - deleted_at
    finally:
        _stop(proc)
    text = log.read_text()
    assert code == 3, text[-3000:]
    errors = _error_lines(text)
    assert len(errors) == 1 and "deleted" in errors[0], text[-3000:]
    noise = sum(1 for line in text.splitlines() if "commit" in line and "fail" in line)
    assert noise <= 3, f"{noise} commit-failure lines: {text[-3000:]}"
    assert "Traceback" not in text
    report_figures("topic_deleted", messages=100, exit_code=code, exited_after_s=round(exited_after, 1),
                   error_lines=len(errors), commit_failure_lines=noise)


# -- 3, 4: handlers that raise what is not an Exception, and async handlers ---------------------------------


def test_base_exceptions_and_unprintable_errors_are_handler_failures_and_the_partition_moves_on(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n = 40
    bad = {5: "systemexit", 12: "keyboardinterrupt", 20: "cancelled", 30: "badstr"}
    topic, group = make_topic(partitions=1), unique("g")
    record, summary = tmp_path / "handled.txt", tmp_path / "summary.json"
    _produce(bootstrap, topic, [{"id": i, "act": bad.get(i, "ok")} for i in range(n)], partition=0)
    started = time.monotonic()
    result = run_script(
        PROG, *_base_args(topic, group, "--max-thread-count", "1", "--on-failure", "skip", "--max-attempts", "2",
                          "--retry-backoff", "0.01", "--idle-exit", "3", "--summary-json", str(summary)),
        env=script_env(bootstrap, MTC75_TEST_RECORD=str(record)), timeout=60,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr
    handled = {r[2] for r in _records(record)}
    assert handled == set(range(n)) - set(bad)
    stats = json.loads(summary.read_text())
    assert (stats["failed"], stats["skipped"], stats["retried"]) == (len(bad), len(bad), len(bad))
    assert committed_offsets(bootstrap, group, topic) == {0: n}
    assert "str() failed" in result.stderr  # the unprintable error is still reported
    report_figures("handler_base_exceptions", messages=n, raising=len(bad), handled=len(handled),
                   failed=stats["failed"], retried=stats["retried"], committed=n, threads=1, run_s=round(took, 1))


def test_an_async_handler_runs_and_an_awaitable_result_of_a_plain_one_is_a_failure_never_done(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group, other = make_topic(partitions=1), unique("g"), unique("g")
    record = tmp_path / "handled.txt"
    _produce(bootstrap, topic, [{"id": i} for i in range(5)], partition=0)
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    base = ["--topic", topic, "--no-reload", "--idle-exit", "3"]
    hidden = run_script(PROG, *base, "--group-id", group, "--handler",
                        "tests.hardening_handler:handle_returns_coroutine", "--on-failure", "stop",
                        "--max-attempts", "1", env=env, timeout=60)
    assert hidden.returncode == 5, hidden.stderr[-2000:]
    assert "awaitable" in hidden.stderr and "make the handler itself async def" in hidden.stderr
    committed = committed_offsets(bootstrap, group, topic)[0]
    assert committed < 0, f"committed {committed}: work that never ran counted done"
    assert _records(record) == []
    # the same work as an async def handler is awaited on the event loop (issue 12): all handled
    awaited = run_script(PROG, *base, "--group-id", other, "--handler", "tests.hardening_handler:handle_async",
                         env=env, timeout=60)
    assert awaited.returncode == 0, awaited.stderr[-2000:]
    assert sorted(r[2] for r in _records(record)) == list(range(5))
    assert committed_offsets(bootstrap, other, topic) == {0: 5}
    report_figures("async_handler", awaitable_exit_code=hidden.returncode, awaitable_committed=max(0, committed),
                   async_exit_code=awaited.returncode, async_handled=len(_records(record)),
                   async_committed=committed_offsets(bootstrap, other, topic)[0])


def test_handler_refusal_and_error_text_without_a_broker() -> None:
    """The start-up check sees through partials and callable objects; error text never raises."""
    import functools

    async def coro(msg: object) -> None: ...

    class Callable_:
        async def __call__(self, msg: object) -> None: ...

    async def agen(msg: object) -> object:  # returns no awaitable: nothing would ever run
        yield msg

    class GenCallable:
        async def __call__(self, msg: object) -> object:
            yield msg

    for handler in (agen, functools.partial(agen), GenCallable()):
        with pytest.raises(HandlerRefused, match="async generator"):
            prepare_handler(handler)  # type: ignore[arg-type]
    for handler in (coro, functools.partial(coro), Callable_(), print):  # async ones run on the event loop
        assert prepare_handler(handler) is handler  # type: ignore[arg-type]

    class Bad(Exception):
        def __str__(self) -> str:
            raise RuntimeError

    assert describe_error(Bad()).startswith("Bad: <str() failed")
    # A worker survives a BaseException and keeps its permit cycle: the message is failed, not stranded.
    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    state = tracker.state(("t", 0))

    def explode(msg: object) -> None:
        raise SystemExit(1)

    dispatcher = Dispatcher(Invoker(explode), 1)
    try:
        tracker.admit(state, 0)
        dispatcher.put([Work(FakeMessage("t", 0, 0), state, 0)])
        wait_until(lambda: len(dispatcher.completions) == 1, 5, what="failed completion")
        assert dispatcher.completions[0].failed and "SystemExit" in dispatcher.completions[0].error
        wait_until(lambda: dispatcher.active_thread_count == 0, 5, what="permit back")
    finally:
        dispatcher.shutdown(wait=True)


# -- 5: a record too large to dead-letter -----------------------------------------------------------------


def test_record_too_large_for_the_dlq_is_dead_lettered_truncated_and_never_sticks_the_partition(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    record = tmp_path / "handled.txt"
    big = {"id": 1, "act": "fail", "pad": "x" * 999_900}  # ~1 MB: with the mtc75.* headers over 1 000 000
    records = [{"id": 0}, big, *({"id": i} for i in range(2, 10))]
    _produce(bootstrap, topic, records, partition=0, conf={"message.max.bytes": 1_048_576})
    args = _base_args(topic, group, "--on-failure", "dlq", "--max-attempts", "1", "--idle-exit", "3")
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    started = time.monotonic()
    first = run_script(PROG, *args, env=env, timeout=90)
    took = time.monotonic() - started
    assert first.returncode == 0, first.stderr[-3000:]
    assert {r[2] for r in _records(record)} == set(range(10)) - {1}
    assert committed_offsets(bootstrap, group, topic) == {0: 10}
    (dlq,) = read_topic(bootstrap, topic + ".dlq", 1)
    headers = {k: v.decode() for k, v in (dlq.headers() or [])}
    assert headers[H_OFFSET] == "1" and int(headers[H_TRUNCATED]) == len(json.dumps(big))
    assert len(dlq.value()) <= TRUNCATED_VALUE_BYTES
    again = run_script(PROG, *args, env=env, timeout=60)  # a restart has nothing left to redo
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(_records(record)) == 9
    report_figures("dlq_record_too_large", original_bytes=len(json.dumps(big)), dlq_value_bytes=len(dlq.value()),
                   exit_code=first.returncode, committed=10, restart_exit_code=again.returncode, run_s=round(took, 1))


def test_dlq_record_that_fits_no_way_stops_with_exit_5_naming_the_offset(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    """The other side of the rule: when even the bare record cannot be published, exit 5, commit below it."""
    topic, group = make_topic(partitions=1), unique("g")
    admin = _admin(bootstrap)
    # A DLQ topic whose records may not exceed 64 bytes: nothing with the mtc75.* headers fits.
    admin.create_topics([NewTopic(topic + ".dlq", 1, 1, config={"max.message.bytes": "64"})])[
        topic + ".dlq"].result(timeout=30)
    record = tmp_path / "handled.txt"
    _produce(bootstrap, topic, [{"id": 0}, {"id": 1, "act": "fail"}, *({"id": i} for i in range(2, 6))], partition=0)
    result = run_script(PROG, *_base_args(topic, group, "--on-failure", "dlq", "--max-attempts", "1",
                                          "--idle-exit", "5"),
                        env=script_env(bootstrap, MTC75_TEST_RECORD=str(record)), timeout=90)
    assert result.returncode == 5, result.stderr[-3000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and f"{topic}[0]@1" in errors[0] and "dead-letter" in errors[0], result.stderr[-2000:]
    committed = committed_offsets(bootstrap, group, topic)[0]
    assert committed <= 1, f"committed {committed}: past the message that was never dead-lettered"
    report_figures("dlq_unpublishable", exit_code=result.returncode, committed=committed, failed_offset=1)


# -- 6: a handler that never returns, on every exit path ------------------------------------------------------


@pytest.mark.parametrize("path", ["on_failure_stop", "sigterm", "sigint", "max_messages", "idle_exit"])
def test_hung_handler_every_exit_path_ends_within_shutdown_timeout_and_says_what_it_abandoned(
    path: str, bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n = 12
    topic, group = make_topic(partitions=1), unique("g")
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    acts = {0: "hang", 6: "fail"} if path == "on_failure_stop" else {0: "hang"}
    _produce(bootstrap, topic, [{"id": i, "act": acts.get(i, "ok")} for i in range(n)], partition=0)
    extra = {"on_failure_stop": ["--on-failure", "stop", "--max-attempts", "1"],
             "max_messages": ["--max-messages", "5"], "idle_exit": ["--idle-exit", "2"]}.get(path, [])
    expected = {"on_failure_stop": 5}.get(path, 0)
    args = _base_args(topic, group, "--max-thread-count", "2", "--shutdown-timeout", str(SHUTDOWN), *extra)
    proc = _start(args, script_env(bootstrap, MTC75_TEST_RECORD=str(record)), log)
    try:
        ok_count = n - len(acts)
        # max_messages 5 admits the hung message and 4 others: it ends once those finished nothing for
        # SHUTDOWN_TIMEOUT, and the shutdown waits as long again
        wait_until(lambda: len(_records(record)) >= (4 if path == "max_messages" else ok_count), 60,
                   what="the other messages handled")
        trigger = time.monotonic()
        if path in ("sigterm", "sigint"):
            proc.send_signal(signal.SIGTERM if path == "sigterm" else signal.SIGINT)
        budget = SHUTDOWN + EXIT_SLACK + {"idle_exit": 2.0, "max_messages": SHUTDOWN}.get(path, 0.0)
        try:
            code = proc.wait(timeout=budget + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{path}: still running {budget + 20:.0f}s later: {log.read_text()[-2000:]}")
        took = time.monotonic() - trigger
    finally:
        _stop(proc)
    text = log.read_text()
    assert code == expected, text[-3000:]
    assert took <= budget, f"{path}: exit {took:.1f}s after the trigger (budget {budget:.0f}s)"
    assert "abandoned 1 handlers" in text, text[-3000:]
    assert "Traceback" not in text
    committed = committed_offsets(bootstrap, group, topic)[0]
    assert committed < 1, f"committed {committed} past the hung message at offset 0"
    report_figures(f"hung_handler_{path}", exit_code=code, exit_after_s=round(took, 1),
                   shutdown_timeout_s=SHUTDOWN, abandoned=1, committed_past_hung=0)


def test_second_sigterm_exits_143_at_once(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    _produce(bootstrap, topic, [{"id": 0, "act": "hang"}, {"id": 1}], partition=0)
    proc = _start(_base_args(topic, group, "--shutdown-timeout", "60"),
                  script_env(bootstrap, MTC75_TEST_RECORD=str(record)), log)
    try:
        wait_until(lambda: len(_records(record)) >= 1, 60, what="the other message handled")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in log.read_text(), 10, what="the first SIGTERM taken")
        second = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        took = time.monotonic() - second
    finally:
        _stop(proc)
    assert code == 143, log.read_text()[-2000:]
    assert took < 3.0
    report_figures("second_sigterm", exit_code=code, exit_after_s=round(took, 2))


# -- 7: a fenced static member ------------------------------------------------------------------------------


def test_fenced_static_member_stops_at_once_and_nothing_more_is_handled_or_committed(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    n, threads, backlog = 1500, 2, 50
    topic, group = make_topic(partitions=3), unique("g")
    record, log_a, log_b = tmp_path / "handled.txt", tmp_path / "a.log", tmp_path / "b.log"
    _produce(bootstrap, topic, [{"id": i} for i in range(n)])
    static = ["-X", f"group.instance.id={group}-member", "-X", "session.timeout.ms=10000"]
    args = _base_args(topic, group, "--max-thread-count", str(threads), "--max-backlog", str(backlog), *static)
    a = _start(args, script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="0.01",
                                MTC75_TEST_TAG="A"), log_a)
    b = None
    try:
        wait_until(lambda: len(_records(record)) >= 200, 60, what="A under way")
        b_started = time.monotonic()
        b = _start([*args, "--idle-exit", "5"], script_env(bootstrap, MTC75_TEST_RECORD=str(record),
                                                           MTC75_TEST_TAG="B"), log_b)
        code_a = a.wait(timeout=40)
        a_exit_s = time.monotonic() - b_started
        a_at_exit = sum(1 for r in _records(record) if r[3] == "A")
        code_b = b.wait(timeout=90)
    finally:
        _stop(a)
        if b is not None:
            _stop(b)
    text_a = log_a.read_text()
    assert code_a == 6, text_a[-3000:]
    errors = _error_lines(text_a)
    assert len(errors) == 1 and "fatal" in errors[0].lower(), text_a[-3000:]
    assert code_b == 0, log_b.read_text()[-3000:]
    records = _records(record)
    assert sum(1 for r in records if r[3] == "A") == a_at_exit, "A handled messages after it exited"
    counts = Counter((r[0], r[1]) for r in records)
    ends = end_offsets(bootstrap, topic)
    lost = {(p, o) for p, end in ends.items() for o in range(end)} - set(counts)
    duplicates = sum(c - 1 for c in counts.values())
    assert not lost, f"lost {len(lost)}"
    # A can only repeat what it had in flight or finished since its last commit (0.2 s at ~200/s).
    bound = threads + backlog + 100
    assert duplicates <= bound, f"{duplicates} duplicates > {bound}: the fenced member went on"
    assert committed_offsets(bootstrap, group, topic) == ends
    report_figures("fenced_static_member", messages=n, lost=len(lost), duplicates=duplicates,
                   duplicate_bound=bound, fenced_exit_code=code_a, fenced_exit_after_s=round(a_exit_s, 1))


# -- 8: stdout closed -------------------------------------------------------------------------------------


def test_stdout_closed_stops_the_status_lines_and_consuming_goes_on(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=2), unique("g")
    record, err_log = tmp_path / "handled.txt", tmp_path / "stderr.log"
    _produce(bootstrap, topic, [{"id": i} for i in range(50)])
    with open(err_log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / PROG), *_base_args(topic, group, "--no-dashboard")],
            env=script_env(bootstrap, MTC75_TEST_RECORD=str(record)), cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
        )
    try:
        assert proc.stdout is not None
        for _ in range(2):  # like `| head -2`
            assert proc.stdout.readline()
        proc.stdout.close()
        closed_at = time.monotonic()
        time.sleep(2.5)  # two more status lines go to the closed pipe
        _produce(bootstrap, topic, [{"id": i} for i in range(50, 100)])
        wait_until(lambda: len({r[2] for r in _records(record)}) == 100, 30, what="consuming after stdout closed")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        _stop(proc)
    text = err_log.read_text()
    assert code == 0, text[-2000:]
    assert "Traceback" not in text and "BrokenPipe" not in text
    report_figures("stdout_closed", exit_code=code, handled_after_close=50,
                   ran_after_close_s=round(time.monotonic() - closed_at, 1))


# -- 9: bad input at start -----------------------------------------------------------------------------------


def test_bad_input_at_start_is_one_error_line_and_exit_2_before_any_message(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    record = tmp_path / "handled.txt"
    _produce(bootstrap, topic, [{"id": i} for i in range(5)], partition=0)
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    base = _base_args(topic, group, "--idle-exit", "3")
    cases = {
        "invalid -X value": [*base, "-X", "max.poll.interval.ms=abc"],
        "unknown -X property": [*base, "-X", "no.such.property=1"],
        "--summary-json in a missing directory": [*base, "--summary-json", str(tmp_path / "nope" / "s.json")],
        "--summary-json is a directory": [*base, "--summary-json", str(tmp_path)],
        "handler calls sys.exit at import": [*[a for a in base if a not in HANDLER], "--handler",
                                             "tests.exit_at_import:handle"],
    }
    codes = {}
    for name, args in cases.items():
        result = run_script(PROG, *args, env=env, timeout=30)
        codes[name] = result.returncode
        assert result.returncode == 2, f"{name}: exit {result.returncode}: {result.stderr[-1500:]}"
        assert len(_error_lines(result.stderr)) == 1, f"{name}: {result.stderr[-1500:]}"
        assert "Traceback" not in result.stderr, name
    for script in ("producer.py", "create_topic.py"):
        result = run_script(script, "--topic", topic, "-X", "no.such.property=1", env=env, timeout=30)
        assert result.returncode == 2 and len(_error_lines(result.stderr, script)) == 1, result.stderr[-1500:]
        codes[script] = result.returncode
    assert _records(record) == [], "a message was handled before the bad input was reported"
    report_figures("bad_input_at_start", cases=len(codes), exit_codes=sorted(set(codes.values())), handled=0)


def test_ctrl_c_in_the_first_instant_of_start_up_is_exit_130_without_a_traceback(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic = make_topic(partitions=1)
    outcomes = []
    delays = (0.1, 0.2, 0.3, 0.5, 0.8)
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / PROG), *_base_args(topic, unique("g"), "-q")], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=script_env(bootstrap, MTC75_TEST_RECORD=str(tmp_path / "handled.txt")),
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        # Frames of our code: the venv lives under ROOT too, and a Ctrl-C while Python's own `site`
        # start-up imports from it (seen at 0.1 s on the loaded 2-core box) is not ours to handle.
        ours = [line for line in err.splitlines() if str(ROOT) in line and "site-packages" not in line]
        if all("mtc75_consumer.py\", line 6," in line for line in ours) and proc.returncode != 130:
            # So early that Python was still starting, or importing the first line (mtc75._startup, which
            # installs the handler): nothing of ours had run. Not what this test is about.
            continue
        assert "Traceback" not in err, err
        # 130 while starting; 0 once the consumer runs (a first Ctrl-C is a graceful stop)
        assert proc.returncode in (0, 130), (delay, proc.returncode, err)
        outcomes.append(proc.returncode)
    assert 130 in outcomes, outcomes
    report_figures("ctrl_c_at_start", delays_s=list(delays), exit_codes=outcomes)


# -- 10: partitions added while consuming -------------------------------------------------------------------


def test_partitions_added_while_consuming_are_read_within_30_seconds(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=1), unique("g")
    record, log = tmp_path / "handled.txt", tmp_path / "consumer.log"
    _produce(bootstrap, topic, [{"id": i} for i in range(10)], partition=0)
    proc = _start(_base_args(topic, group), script_env(bootstrap, MTC75_TEST_RECORD=str(record)), log)
    try:
        wait_until(lambda: len(_records(record)) >= 10, 60, what="first partition handled")
        admin = _admin(bootstrap)
        admin.create_partitions([NewPartitions(topic, 3)])[topic].result(timeout=30)
        for p in (1, 2):
            _produce(bootstrap, topic, [{"id": p * 100 + i} for i in range(10)], partition=p)
        produced_at = time.monotonic()
        wait_until(lambda: {r[0] for r in _records(record)} == {0, 1, 2}, 30, step=0.2,
                   what="the new partitions consumed")
        took = time.monotonic() - produced_at
        wait_until(lambda: len(_records(record)) >= 30, 30, what="every message handled")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)
    report_figures("partitions_added", new_partitions=2, first_handled_after_s=round(took, 1), limit_s=30)


# -- 11: a revoke while handlers run longer than max.poll.interval.ms ---------------------------------------


def test_revoke_wait_is_capped_below_max_poll_interval_and_the_member_is_not_evicted(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=2), unique("g")
    record, log_a, log_b = tmp_path / "handled.txt", tmp_path / "a.log", tmp_path / "b.log"
    _produce(bootstrap, topic, [{"id": i} for i in range(8)])
    # REVOKE_TIMEOUT stays at its default (10 s), longer than the 6 s poll interval.
    args = _base_args(topic, group, "--max-thread-count", "2", "--shutdown-timeout", "1",
                      "-X", "max.poll.interval.ms=6000", "-X", "session.timeout.ms=6000")
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record), MTC75_TEST_SLEEP="20")
    a = _start(args, env, log_a)
    b = None
    try:
        wait_until(lambda: "assigned" in log_a.read_text(), 30, what="A assigned")
        time.sleep(1.5)  # A's two threads are busy with 20 s handlers
        b = _start(args, env, log_b)
        wait_until(lambda: "revoke" in log_a.read_text(), 30, what="A's revoke")
        wait_until(lambda: "assigned" in log_b.read_text(), 30, what="B assigned")
        time.sleep(8)  # past A's poll interval: an eviction would show now
        for proc in (a, b):
            proc.send_signal(signal.SIGTERM)
        codes = (a.wait(timeout=30), b.wait(timeout=30))
    finally:
        _stop(a)
        if b is not None:
            _stop(b)
    text = log_a.read_text()
    lines = [line for line in text.splitlines() if "revoke: abandoned" in line]
    assert lines, text[-3000:]
    waited = float(lines[0].split(" after ")[1].split("s")[0])
    assert waited <= 3.5, lines[0]  # half of the 6 s poll interval, not REVOKE_TIMEOUT's 10 s
    assert all(" abandoned 0 " not in line for line in lines)
    evicted = [line for line in text.splitlines() if "poll interval" in line.lower() or " lost " in line]
    assert not evicted, evicted
    assert codes == (0, 0), (text[-2000:], log_b.read_text()[-2000:])
    report_figures("revoke_capped", revoke_timeout_s=10.0, max_poll_interval_s=6.0, revoke_waited_s=waited,
                   evictions=len(evicted), abandoned_at_revoke=int(lines[0].split("abandoned ")[1].split()[0]))


# -- 12: --idle-exit while the group is still rebalancing ---------------------------------------------------


def test_idle_exit_counts_from_the_first_assignment(
    bootstrap: str, make_topic: Callable[..., str], unique: Callable[[str], str], tmp_path: Path
) -> None:
    topic, group = make_topic(partitions=2), unique("g")
    record = tmp_path / "handled.txt"
    env = script_env(bootstrap, MTC75_TEST_RECORD=str(record))
    # A member that dies without leaving: the next join waits for its session (10 s) to expire.
    dead = _start(_base_args(topic, group, "-X", "session.timeout.ms=10000"), env, tmp_path / "dead.log")
    try:
        wait_until(lambda: "assigned" in (tmp_path / "dead.log").read_text(), 30, what="first member assigned")
    finally:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
    _produce(bootstrap, topic, [{"id": i} for i in range(50)])
    started = time.monotonic()
    result = run_script(PROG, *_base_args(topic, group, "--idle-exit", "3"), env=env, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert {r[2] for r in _records(record)} == set(range(50)), f"handled {len(_records(record))} of 50"
    assert took > 5, "the rebalance did not wait for the dead member: the test proves nothing"
    report_figures("idle_exit_after_rebalance", messages=50, handled=50, run_s=round(took, 1), idle_exit_s=3)


# -- policies without a broker ---------------------------------------------------------------------------


def test_topic_id_answers_are_classified_without_a_broker() -> None:
    from mtc75.kafka.topicwatch import Change, classify

    gone = KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
    assert classify("a", "a") is Change.SAME
    assert classify("a", "b") is Change.RECREATED
    assert classify("a", gone) is Change.GONE
    assert classify("a", KafkaException(KafkaError(KafkaError._TIMED_OUT))) is Change.UNKNOWN
    assert classify(None, "b") is Change.SAME  # the first answer is the incarnation we consume


def test_dead_letter_record_refused_for_its_size_is_resent_smaller_and_counted_once() -> None:
    from mtc75.errors import MessageFailed
    from mtc75.kafka.deadletter import DeadLetterProducer

    class Producer_:
        """Refuses, like librdkafka's produce(), records over ``limit`` bytes; confirms the rest."""

        def __init__(self, limit: int) -> None:
            self.limit, self.sent, self._reports = limit, [], []

        def produce(self, topic: str, key: bytes, value: bytes | None, headers: list, on_delivery: Callable) -> None:
            if len(value or b"") > self.limit:
                raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
            self.sent.append((value, dict(headers)))
            self._reports.append(on_delivery)

        def poll(self, _timeout: float) -> None:
            for report in self._reports:
                report(None, None)
            self._reports.clear()

    tracker = OffsetTracker()
    tracker.assign([("t", 0)])
    state = tracker.state(("t", 0))
    for limit, expected in ((100_000, TRUNCATED_VALUE_BYTES), (10, 0)):
        dlq = DeadLetterProducer({}, 0.1)
        dlq._producer = Producer_(limit)  # type: ignore[assignment]
        work = Work(FakeMessage("t", 0, 7, b"x" * 1_000_000, b"k", []), state, 7)
        dlq.publish(work)
        assert dlq.pending == 1
        assert dlq.poll() == [work] and dlq.pending == 0
        value, headers = dlq._producer.sent[-1]  # type: ignore[attr-defined]
        assert len(value or b"") == expected and headers[H_TRUNCATED] == b"1000000"
    dlq = DeadLetterProducer({}, 0.1)

    class Forbidden(Producer_):
        def produce(self, *args: object, **kwargs: object) -> None:
            raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))

    dlq._producer = Forbidden(0)  # type: ignore[assignment]
    with pytest.raises(MessageFailed, match="@7"):
        dlq.publish(Work(FakeMessage("t", 0, 7, b"x", b"k", []), state, 7))
    assert dlq.pending == 0  # a record produce() refused is not counted as pending
